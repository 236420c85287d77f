"""Loading a Llama checkpoint from safetensors into our model, each rank taking its tensor-parallel shard."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open

from services.worker.model import LlamaForCausalLM, ModelArgs, rope_inv_freq
from services.worker.quant import DEFAULT_GROUP_SIZE, quantize_model

logger = logging.getLogger(__name__)


def _checkpoint_files(folder: Path) -> dict[str, Path]:
    """Map each tensor name to the safetensors file holding it."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: folder / file for name, file in weight_map.items()}
    single = folder / "model.safetensors"
    if not single.exists():
        raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {folder}")
    with safe_open(single, framework="pt") as f:
        return {name: single for name in f.keys()}


def _checkpoint_name(param: str) -> tuple[str, int | None]:
    """The checkpoint tensor behind one of our parameters, and the dim it is split along under TP."""
    if param.endswith("o_bias"):
        return param.replace("o_bias", "o_proj.bias"), None
    if param.endswith("down_bias"):
        return param.replace("down_bias", "down_proj.bias"), None
    if any(p in param for p in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")):
        return param, 0
    if any(p in param for p in ("o_proj.weight", "down_proj.weight")):
        return param, 1
    return param, None


def load_model(folder: Path, dtype: torch.dtype, device: torch.device, rank: int = 0, world_size: int = 1,
               group=None, quantize: str | None = None, group_size: int = DEFAULT_GROUP_SIZE) -> LlamaForCausalLM:
    """Build the model from `folder/config.json` and load (this rank's shard of) its safetensors weights,
    then quantize its linear layers when `quantize` names a method (`services/worker/quant.py`)."""
    args = ModelArgs.from_config(json.loads((folder / "config.json").read_text()))
    with torch.device("meta"):
        model = LlamaForCausalLM(args, rank, world_size, group).to(dtype)
    model.to_empty(device=device)
    if args.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.inv_freq = rope_inv_freq(args).to(device)  # stays float32, like the reference
    files = _checkpoint_files(folder)
    handles: dict[Path, object] = {}
    for name, param in model.named_parameters():  # a tied lm_head appears once, as the embedding
        source, split_dim = _checkpoint_name(name)
        if source not in files:
            raise ValueError(f"weight {source} missing from the checkpoint in {folder}")
        if files[source] not in handles:
            handles[files[source]] = safe_open(files[source], framework="pt", device="cpu")
        tensor = handles[files[source]].get_slice(source)
        if split_dim is None or world_size == 1:
            tensor = tensor[:]
        else:
            size = param.shape[split_dim]
            index = slice(rank * size, (rank + 1) * size)
            tensor = tensor[index] if split_dim == 0 else tensor[:, index]
        if tuple(tensor.shape) != tuple(param.shape):
            raise ValueError(f"weight {source} has shape {tuple(tensor.shape)}, expected {tuple(param.shape)}")
        with torch.no_grad():
            param.copy_(tensor)
    # Fused q/k/v and gate/up projections: one GEMM each per layer instead of three and two.
    model.fuse_projections()
    # After sharding: each rank quantizes its own slice (groups stay inside it).
    if quantize_model(model, quantize, group_size) and dtype == torch.float32:
        logger.warning("quantized matmuls run in bfloat16, but the embedding, norms, attention, the layers kept "
                       "in float and the KV cache stay float32: DTYPE_STR=bfloat16 is faster")
    return model.eval().requires_grad_(False)
