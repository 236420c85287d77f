"""Native CPU kernels (kernels/*.cpp): built once per machine with the system C++ compiler, loaded with ctypes.

No torch headers: the sources take raw pointers, so a build takes about a
second and needs only `g++` (or `$CXX`), the compiler `PT2_COMPILE` needs as
well.  Builds are cached by source, compiler and CPU flags under
`$TGIS_KERNEL_CACHE` (default `~/.cache/tgis-pipeline/kernels`); workers that
build at once each write a temporary file and rename it into place.  Without
a compiler, or if the build fails, `load` returns None and the caller keeps
its torch path (logged once).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

logger = logging.getLogger(__name__)

SOURCES = Path(__file__).with_name("kernels")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]


def _cpu_flags() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    return next((line for line in text.splitlines() if line.startswith(("flags", "Features"))), "")


def _cache_dir() -> Path:
    return Path(os.environ.get("TGIS_KERNEL_CACHE") or Path.home() / ".cache" / "tgis-pipeline" / "kernels")


@cache
def load(name: str) -> ctypes.CDLL | None:
    """The kernel library built from kernels/<name>.cpp, or None where it cannot be built here."""
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        logger.warning("No C++ compiler (g++ or $CXX): native CPU kernels are off, attention runs on torch ops")
        return None
    source = (SOURCES / f"{name}.cpp").read_bytes()
    key = hashlib.sha256(b"\0".join([source, compiler.encode(), " ".join(FLAGS).encode(),
                                     _cpu_flags().encode()])).hexdigest()[:16]
    library = _cache_dir() / f"{name}-{key}.so"
    if not library.exists():
        try:
            _build(compiler, SOURCES / f"{name}.cpp", library)
        except (OSError, subprocess.CalledProcessError) as exc:
            detail = getattr(exc, "stderr", None) or exc
            logger.warning("Building native kernel %s failed, attention runs on torch ops: %s", name, detail)
            return None
    return ctypes.CDLL(str(library))


def _build(compiler: str, source: Path, library: Path) -> None:
    library.parent.mkdir(parents=True, exist_ok=True)
    logger.info("Building native CPU kernel %s with %s", source.name, compiler)
    handle, temporary = tempfile.mkstemp(dir=library.parent, suffix=".so")
    os.close(handle)
    try:
        subprocess.run([compiler, *FLAGS, str(source), "-o", temporary], check=True, capture_output=True,
                       text=True, timeout=300)
        os.replace(temporary, library)
    finally:
        Path(temporary).unlink(missing_ok=True)
