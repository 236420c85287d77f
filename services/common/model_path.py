"""Where a model's files are: the HF hub cache (offline, TGIS's env vars and rules) or a local folder."""

from __future__ import annotations

import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)

DEMO_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
_DEPRECATED_CACHE_VARS = ("TRANSFORMERS_CACHE", "HUGGINGFACE_HUB_CACHE")


class ModelNotFoundError(Exception):
    """The model is neither in the local HF cache nor a local folder with a config.json."""





def hub_cache_dir() -> Path:
    """The HF hub cache folder, read from the environment on every call (HF_HUB_CACHE and its legacy names)."""
    var, value = "HF_HUB_CACHE", os.environ.get("HF_HUB_CACHE")
    for dep in _DEPRECATED_CACHE_VARS:
        dep_value = os.environ.get(dep)
        if dep_value is None:
            continue
        if value is None:
            var, value = dep, dep_value
        elif dep_value != value:
            raise ValueError(f"{dep} and {var} env vars can't be set to different values")
        logger.warning("%s is deprecated, use HF_HUB_CACHE instead", dep)
    if value:
        return Path(value).expanduser()
    return _hf_home() / "hub"


def _hf_home() -> Path:
    if hf_home := os.environ.get("HF_HOME"):
        return Path(hf_home).expanduser()
    xdg_cache = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(xdg_cache).expanduser() / "huggingface"


def repo_cache_dir(model_name: str, cache: Path) -> Path:
    return cache / f"models--{model_name.replace('/', '--')}"


def resolve_model_path(model_name: str, revision: str | None = None) -> Path:
    """The local folder holding `model_name`: its HF cache snapshot for `revision`, else `model_name` as a path."""
    repo_dir = repo_cache_dir(model_name, hub_cache_dir())
    if repo_dir.is_dir():
        return _snapshot_dir(repo_dir, model_name, revision or "main")
    if (Path(model_name) / "config.json").is_file():
        return Path(model_name)
    raise ModelNotFoundError(f"Model {model_name} not found")


def _snapshot_dir(repo_dir: Path, model_name: str, revision: str) -> Path:
    ref_file = repo_dir / "refs" / revision
    # A revision without a ref file is taken to be a commit hash already.
    commit = ref_file.read_text().strip() if ref_file.is_file() else revision
    snapshot = repo_dir / "snapshots" / commit
    if not (snapshot / "config.json").is_file():
        raise ModelNotFoundError(f"Config file not found in local cache for model {model_name}, revision {revision}")
    return snapshot

