"""LoRA adapters (`adapter_id`) in ADAPTER_CACHE: the vLLM TGIS adapter's id rules and messages, and whether an
adapter's files fit the model, checked without torch.

The layout is the vLLM TGIS adapter's: one folder per adapter id under
ADAPTER_CACHE, holding a PEFT LoRA adapter as `save_pretrained` writes it
(`adapter_config.json` and `adapter_model.safetensors`, or
`adapter_model.bin`).  The gateway runs `find_adapter` and `check_fit` (on
the safetensors header) before anything is queued, so a bad id or adapter is
INVALID_ARGUMENT; the workers run `check_fit` again on the loaded tensors
(`services/worker/lora.py`), which also covers `.bin` files.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from services.common.prompt_prefixes import store_folder

# The vLLM TGIS adapter's messages (vllm_tgis_adapter/grpc/validation.py, TGISValidationError).
ADAPTER_NOT_FOUND = "can't retrieve adapter with id '{0}': {1}"
ADAPTERS_DISABLED = "adapter_id supplied but no adapter store was configured"
ADAPTER_UNSUPPORTED = "adapter type {0} is not currently supported"
INVALID_ADAPTER_ID = "Invalid adapter id '{0}', must contain only alphanumeric, _ and - and /"
# Ours, for adapters that exist but cannot be served on this model.
ADAPTER_MISFIT = "can't load adapter with id '{0}': {1}"

WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
PEFT_PREFIX = "base_model.model."  # PEFT's key prefix in front of the base model's module names
LORA_KEY = re.compile(r"(.+)\.lora_([AB])(?:\.[^.]+)?\.weight")  # PEFT >= 0.7 drops the adapter name from keys
# PEFT LoRA options that change the computation beyond y += scale * B(A(x)): refused rather than served wrong.
UNSUPPORTED_OPTIONS = {
    "use_dora": "DoRA", "lora_bias": "LoRA biases", "modules_to_save": "modules_to_save",
    "trainable_token_indices": "trainable_token_indices", "alora_invocation_tokens": "aLoRA",
    "target_parameters": "target_parameters", "fan_in_fan_out": "fan_in_fan_out", "use_bdlora": "BD-LoRA",
}


class AdapterError(ValueError):
    """The adapter id or its files cannot be served; the text is the client-facing message."""


@dataclass(frozen=True)
class AdapterFiles:
    """A LoRA adapter found in the store: its folder, its parsed adapter_config.json, its weights file."""

    adapter_id: str
    folder: Path
    config: dict
    weights: Path


def find_adapter(root: str | Path, adapter_id: str) -> AdapterFiles:
    """The adapter `adapter_id` of the store at `root`, after the vLLM TGIS adapter's checks, in its words, and ours
    of the LoRA options served here; AdapterError otherwise."""
    root = Path(root).resolve()
    folder = store_folder(root, adapter_id)
    if folder is None:
        raise AdapterError(INVALID_ADAPTER_ID.format(adapter_id))
    if not folder.exists():
        raise AdapterError(ADAPTER_NOT_FOUND.format(adapter_id, "directory does not exist"))
    config_path = folder / "adapter_config.json"
    if not config_path.exists():
        raise AdapterError(ADAPTER_NOT_FOUND.format(adapter_id, "invalid adapter: no adapter_config.json found"))
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise AdapterError(ADAPTER_NOT_FOUND.format(adapter_id, f"invalid adapter_config.json: {exc}")) from exc
    if config.get("peft_type") != "LORA":
        raise AdapterError(ADAPTER_UNSUPPORTED.format(config.get("peft_type")))
    used = [name for option, name in UNSUPPORTED_OPTIONS.items() if config.get(option)]
    if config.get("bias", "none") != "none":
        used.append(f"bias={config['bias']!r}")
    if used:
        raise AdapterError(ADAPTER_MISFIT.format(adapter_id, f"LoRA with {', '.join(used)} is not supported"))
    weights = next((folder / name for name in WEIGHT_FILES if (folder / name).exists()), None)
    if weights is None:
        raise AdapterError(ADAPTER_NOT_FOUND.format(
            adapter_id, f"invalid adapter: no {' or '.join(WEIGHT_FILES)} found"))
    return AdapterFiles(adapter_id, folder, config, weights)


def safetensors_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor name -> shape from a safetensors file's JSON header (the tensors are not read)."""
    with path.open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    return {name: entry["shape"] for name, entry in header.items() if name != "__metadata__"}


def lora_pairs(adapter_id: str, shapes: dict[str, list[int]]) -> tuple[dict[str, tuple[list[int], list[int]]], list[str]]:
    """Base model module name -> (lora_A shape, lora_B shape), and the names of tensors that are not LoRA weights
    (saved base layers); AdapterError for a lone half."""
    halves: dict[str, dict[str, list[int]]] = {}
    others = []
    for name, shape in shapes.items():
        match = LORA_KEY.fullmatch(name.removeprefix(PEFT_PREFIX))
        if match is None:
            others.append(name)
        else:
            halves.setdefault(match.group(1), {})[match.group(2)] = list(shape)
    if lone := sorted(module for module, pair in halves.items() if len(pair) != 2):
        raise AdapterError(ADAPTER_MISFIT.format(adapter_id, f"{lone[0]} has lora_A or lora_B but not both"))
    return {module: (pair["A"], pair["B"]) for module, pair in halves.items()}, sorted(others)


def check_fit(adapter_id: str, shapes: dict[str, list[int]], modules: dict[str, list[int]]) -> None:
    """AdapterError unless every tensor in `shapes` is half of a LoRA pair targeting one of `modules` (leaf name ->
    [in, out] of the model's full layer) with A [r, in] and B [out, r]."""
    if not modules:
        raise AdapterError(ADAPTER_MISFIT.format(
            adapter_id, "this model does not serve LoRA adapters (tgis_native Llama-family models do)"))
    pairs, others = lora_pairs(adapter_id, shapes)
    if not pairs:
        raise AdapterError(ADAPTER_MISFIT.format(adapter_id, "no LoRA weights found"))
    for module, (a, b) in sorted(pairs.items()):
        leaf = module.rpartition(".")[2]
        if leaf not in modules:
            raise AdapterError(ADAPTER_MISFIT.format(
                adapter_id, f"target module {module} is not one LoRA is served on for this model "
                            f"(supported: {', '.join(sorted(modules))})"))
        fan_in, fan_out = modules[leaf]
        if len(a) != 2 or len(b) != 2 or a[1] != fan_in or b[0] != fan_out or a[0] != b[1]:
            raise AdapterError(ADAPTER_MISFIT.format(
                adapter_id, f"{module}: lora_A {a} and lora_B {b} do not fit the model's layer "
                            f"({fan_in} in, {fan_out} out); was the adapter trained on another base model?"))
    if others:
        raise AdapterError(ADAPTER_MISFIT.format(
            adapter_id, f"tensor {others[0]} is not a LoRA A/B weight (adapters saving base layers are not served)"))
