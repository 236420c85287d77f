"""Wait until a model's files are complete in the HF cache: the `wait-for-model` init step of the Kubernetes pods.

Complete means `config.json` plus the safetensors weights: every shard an
index names, or at least one `*.safetensors` file without an index.  A
download in progress (files appear one by one) is therefore not taken for a
model.  SIGTERM ends the wait at once (exit 143), so a pod being deleted does
not hang in its init container until the kubelet's SIGKILL.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import time
from pathlib import Path

from services.common.model_path import ModelNotFoundError, resolve_model_path

log = logging.getLogger(__name__)

SAFETENSORS_INDEX = "model.safetensors.index.json"


def missing_files(model_dir: Path) -> str | None:
    """What `model_dir` still lacks before a worker can load it (None: nothing)."""
    index = model_dir / SAFETENSORS_INDEX
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [name for name in shards if not (model_dir / name).is_file()]
        return f"{len(missing)} of {len(shards)} weight shards missing, e.g. {missing[0]}" if missing else None
    if not any(model_dir.glob("*.safetensors")):
        return f"no .safetensors weights in {model_dir}"
    return None


def _exit_on_sigterm(signum: int, _frame) -> None:
    log.info("%s received: no longer waiting for the model", signal.Signals(signum).name)
    sys.exit(128 + signum)


def wait_for_model(model_name: str, revision: str | None, interval: float, timeout: float) -> Path:
    """The model's folder once complete; polls every `interval` s, TimeoutError after `timeout` s (0: no limit)."""
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    deadline = time.monotonic() + timeout if timeout > 0 else None
    while True:
        try:
            model_dir = resolve_model_path(model_name, revision)
            problem = missing_files(model_dir)
        except (ModelNotFoundError, OSError, ValueError, KeyError) as exc:  # not there yet, or an index mid-write
            problem = str(exc)
        if problem is None:
            log.info("model %s ready at %s", model_name, model_dir)
            return model_dir
        if deadline is not None and time.monotonic() >= deadline:
            raise TimeoutError(f"model {model_name} not complete after {timeout:.0f} s: {problem}")
        log.info("waiting for model %s: %s", model_name, problem)
        time.sleep(interval)
