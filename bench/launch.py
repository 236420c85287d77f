"""Start `text-generation-launcher` on free ports for a benchmark run, wait until healthy, stop it with SIGTERM."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

log = logging.getLogger("bench.launch")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


REPO_ROOT = Path(__file__).resolve().parents[1]


def launcher_command() -> list[str]:
    """The launcher console script of this environment; `python -m` when it is not installed as a script."""
    beside_python = Path(sys.executable).with_name("text-generation-launcher")
    if beside_python.exists():
        return [str(beside_python)]
    on_path = shutil.which("text-generation-launcher")
    return [on_path] if on_path else [sys.executable, "-m", "services.launcher"]


def launcher_env() -> dict[str, str]:
    """This environment, plus the source tree on PYTHONPATH so `python -m services.launcher` works from anywhere."""
    paths = [str(REPO_ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


class LaunchedServer:
    """A launcher subprocess serving `model`; its output goes to a log file that is shown if it fails."""

    def __init__(self, model: str, extra_args: list[str], log_path: Path | None = None, host: str = "localhost",
                 env: dict[str, str] | None = None) -> None:
        self.grpc_port, self.http_port = free_port(), free_port()
        self.host = host
        self.env = {**launcher_env(), **(env or {})}
        self.log_path = log_path or Path(tempfile.mkdtemp(prefix="tgis-bench-")) / "launcher.log"
        self.argv = [*launcher_command(), "--model-name", model, "--port", str(self.http_port),
                     "--grpc-port", str(self.grpc_port), *extra_args]
        self.process: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/metrics"

    @property
    def pid(self) -> int | None:
        """The launcher's process id while it runs (its children are the services)."""
        return self.process.pid if self.process else None

    def start(self, timeout: float) -> LaunchedServer:
        """Start the launcher and wait for /health to answer 200; raise (after stopping it) if it does not."""
        log.info("starting %s (log: %s)", " ".join(self.argv), self.log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log_file:
            # The child keeps its own copy of the file descriptor.
            self.process = subprocess.Popen(self.argv, stdout=log_file, stderr=subprocess.STDOUT, env=self.env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"launcher exited with {self.process.returncode}:\n{self.log_tail()}")
            if self.health()[0] == 200:
                log.info("server healthy at %s", self.address)
                return self
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"server not healthy after {timeout:.0f} s:\n{self.log_tail()}")

    def health(self) -> tuple[int, str]:
        """Status and body of GET /health (0 when nothing answers)."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/health", timeout=60) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()
        except OSError:
            return 0, ""

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM (the launcher drains and stops its children), SIGKILL if it does not exit in `timeout`."""
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("launcher did not stop in %.0f s; killing it", timeout)
            self.process.kill()
            code = self.process.wait()
        log.info("server stopped (exit code %s)", code)
        self.process = None
        return code

    def log_tail(self, lines: int = 40) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])
