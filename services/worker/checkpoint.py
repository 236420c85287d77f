"""Loading the worker's model on the engine DEPLOYMENT_FRAMEWORK selects; `tgis_native` safetensors shard by shard.

`load_model` picks the engine (`frameworks.py`); a `hf_transformers` model is
transformers' own loading (`models/hf_transformers.py`), a `tgis_native` one
is loaded here from safetensors, each rank taking its tensor-parallel shard.

Our parameters have the same names in every family (`models/layers.py`); a
family's `modules(args)` says which checkpoint module fills each of ours.
What a rank keeps depends on the parameter's role, not on the family:
* fused QKV: the checkpoint's q, k and v (separate tensors, or one fused
  tensor in the family's layout) are cut into whole heads; this rank keeps its
  query heads and its KV heads (a copy of its group's KV head when there are
  fewer KV heads than ranks), stored as [q; k; v];
* the MLP's up projections (gate and up for gated MLPs): this rank's rows of
  each part;
* output projections (attention and MLP down): this rank's input columns;
* everything else (embeddings, norms, biases added after the all-reduce,
  the LM head): the whole tensor.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch
from safetensors import safe_open

from services.worker.frameworks import NATIVE, choose_framework
from services.worker.models.decoder import DecoderLM
from services.worker.models.hf_seq2seq import load_hf_seq2seq
from services.worker.models.hf_transformers import load_hf_model
from services.worker.models.layers import DecoderArgs
from services.worker.models.registry import ENCODER_DECODER_TYPES, family
from services.worker.models.t5 import T5Args, T5ForConditionalGeneration
from services.worker.packed_linear import pack_linear_layers
from services.worker.quant import DEFAULT_GROUP_SIZE, quantize_model

logger = logging.getLogger(__name__)

NO_SAFETENSORS = "No safetensors weights found - required for tgis_native engine"
_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
# Row-parallel biases are parameters of their own (added once, after the all-reduce).
_BIASES = {"attn.o_bias": "attn.o_proj.bias", "mlp.down_bias": "mlp.down_proj.bias"}


def checkpoint_files(folder: Path) -> dict[str, Path]:
    """Map each tensor name to the safetensors file holding it (index, single file, or every *.safetensors)."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: folder / file for name, file in weight_map.items()}
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(NO_SAFETENSORS)
    names = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            names.update(dict.fromkeys(f.keys(), file))
    return names


def checkpoint_sources(param: str, modules: dict[str, str | tuple[str, ...]]) -> list[str]:
    """The checkpoint tensor(s) behind one of our parameters (several for q/k/v or gate/up stored apart)."""
    match = _LAYER.fullmatch(param)
    layer, name = (match.group(1), match.group(2)) if match else (None, param)
    name = _BIASES.get(name, name)
    module, _, leaf = name.rpartition(".")
    key = f"model.layers.{{i}}.{module}" if layer is not None else module
    if key not in modules:
        raise ValueError(f"no checkpoint tensor is known for parameter {param}")
    source = modules[key]
    parts = source if isinstance(source, tuple) else (source,)
    return [f"{part.format(i=layer)}.{leaf}" for part in parts]


def _rank_heads(t: torch.Tensor, heads: int, head_dim: int, rank: int, world_size: int) -> torch.Tensor:
    """This rank's heads of t [heads * head_dim, ...]: its share, or its group's head when heads < world_size."""
    if heads >= world_size:
        per = heads // world_size
        return t[rank * per * head_dim: (rank + 1) * per * head_dim]
    head = rank * heads // world_size
    return t[head * head_dim: (head + 1) * head_dim]


def _qkv(parts: list[torch.Tensor], args: DecoderArgs, rank: int, world_size: int) -> torch.Tensor:
    """This rank's [q; k; v] rows from the checkpoint's separate or fused QKV tensor (weight or bias)."""
    h, kv, d = args.num_heads, args.num_kv_heads, args.head_dim
    if len(parts) == 1 and args.qkv_layout == "grouped":  # per KV group: its queries, then its key and value
        grouped = parts[0].reshape(kv, h // kv + 2, d, *parts[0].shape[1:])
        parts = [grouped[:, :-2].reshape(h * d, *parts[0].shape[1:]),
                 grouped[:, -2].reshape(kv * d, *parts[0].shape[1:]),
                 grouped[:, -1].reshape(kv * d, *parts[0].shape[1:])]
    elif len(parts) == 1:
        parts = list(parts[0].split([h * d, kv * d, kv * d]))
    q, k, v = parts
    return torch.cat([_rank_heads(q, h, d, rank, world_size), _rank_heads(k, kv, d, rank, world_size),
                      _rank_heads(v, kv, d, rank, world_size)])


def shard_tensor(param: str, parts: list[torch.Tensor], args: DecoderArgs, rank: int, world_size: int) -> torch.Tensor:
    """This rank's part of the full checkpoint tensor(s) behind `param`, by the parameter's role."""
    if param.endswith(("attn.qkv_proj.weight", "attn.qkv_proj.bias")):
        return _qkv(parts, args, rank, world_size)
    if param.endswith(("mlp.up_proj.weight", "mlp.up_proj.bias")):
        return torch.cat([part.chunk(world_size)[rank] for part in parts])
    if param.endswith(("attn.o_proj.weight", "mlp.down_proj.weight")):
        return parts[0].chunk(world_size, dim=1)[rank]
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def load_model(folder: Path, dtype: torch.dtype, device: torch.device, rank: int = 0, world_size: int = 1,
               group=None, quantize: str | None = None, group_size: int = DEFAULT_GROUP_SIZE,
               framework: str | None = None, pack_linears: bool = True, float32_prepack: str = "auto"
               ) -> torch.nn.Module:
    """The model of `folder` on the engine DEPLOYMENT_FRAMEWORK (`framework`) selects (`frameworks.py`): this
    rank's shard of a `tgis_native` model, or a transformers model on the paged cache; its linear layers then
    quantized when `quantize` names a method (`quant.py`), and the float ones prepacked on CPU
    (`packed_linear.py`: bfloat16, float32 by `float32_prepack`) unless `pack_linears` is False (a compiled model
    packs inside the graph instead)."""
    config = json.loads((folder / "config.json").read_text())
    model_type = config.get("model_type")
    has_safetensors = any(folder.glob("*.safetensors"))
    engine, why = choose_framework(framework, model_type, has_safetensors, world_size)
    logger.info("Engine %s for %s: %s", engine, model_type, why)
    if config.get("is_encoder_decoder") and engine == NATIVE and model_type not in ENCODER_DECODER_TYPES:
        raise ValueError(f"{model_type} is an encoder-decoder model that tgis_native does not implement "
                         f"(it serves {', '.join(ENCODER_DECODER_TYPES)}): use hf_transformers")
    if engine != NATIVE and config.get("is_encoder_decoder"):
        model = load_hf_seq2seq(folder, dtype, device)
    elif engine != NATIVE:
        model = load_hf_model(folder, dtype, device)
    elif model_type in ENCODER_DECODER_TYPES:
        model = _load_t5(folder, config, dtype, device, rank, world_size, group)
    else:
        model = _load_native(folder, config, dtype, device, rank, world_size, group)
    # After sharding: each rank quantizes its own slice (groups stay inside it).
    if quantize_model(model, quantize, group_size) and dtype == torch.float32:
        logger.warning("quantized matmuls run in bfloat16, but the embedding, norms, attention, the layers kept "
                       "in float and the KV cache stay float32: DTYPE_STR=bfloat16 is faster")
    if pack_linears:
        pack_linear_layers(model, dtype, device, float32=float32_prepack)
    return model.eval().requires_grad_(False)


def _load_native(folder: Path, config: dict, dtype: torch.dtype, device: torch.device, rank: int, world_size: int,
                 group) -> DecoderLM:
    """Build the family's model from the registry and load this rank's shard of its safetensors weights."""
    impl = family(config.get("model_type"))
    args = impl.decoder_args(config)
    files = checkpoint_files(folder)  # before building: a folder without safetensors fails fast
    with torch.device("meta"):
        model = DecoderLM(args, rank, world_size, group).to(dtype)
    model.to_empty(device=device)
    if args.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    # Rotary frequencies and ALiBi slopes stay float32, like the reference.
    model.inv_freq, model.alibi_slopes = model.rotary_inv_freq(), model.rank_alibi_slopes()
    if model.inv_freq is not None:
        model.inv_freq = model.inv_freq.to(device)
    if model.alibi_slopes is not None:
        model.alibi_slopes = model.alibi_slopes.to(device)
    modules = impl.modules(args)
    transposed = config["model_type"] in getattr(impl, "TRANSPOSED_TYPES", ())
    read = _Reader(folder, files)
    for name, param in model.named_parameters():  # a tied lm_head appears once, as the embedding
        parts = [read(source) for source in checkpoint_sources(name, modules)]
        if transposed and name.startswith("model.layers.") and parts[0].dim() == 2:
            parts = [part.t() for part in parts]
        _copy(name, param, shard_tensor(name, parts, args, rank, world_size))
    return model


def _load_t5(folder: Path, config: dict, dtype: torch.dtype, device: torch.device, rank: int, world_size: int,
             group) -> T5ForConditionalGeneration:
    """T5 from its safetensors (HF names): q/k/v/wi rows and o/wo/relative-bias columns split by rank."""
    args = T5Args.from_config(config)
    files = checkpoint_files(folder)
    with torch.device("meta"):
        model = T5ForConditionalGeneration(args, rank, world_size, group).to(dtype)
    model.to_empty(device=device)
    if "lm_head.weight" not in files:  # tied to the shared embedding
        model.lm_head.weight = model.shared.weight
    read = _Reader(folder, files)
    for name, param in model.named_parameters():
        tensor, module = read(name), name.split(".")[-2]
        if module in ("q", "k", "v", "wi", "wi_0", "wi_1"):
            tensor = tensor.chunk(world_size)[rank]
        elif module in ("o", "wo", "relative_attention_bias"):
            tensor = tensor.chunk(world_size, dim=1)[rank]
        _copy(name, param, tensor)
    model.distance_bias = model.decoder_bias_table()
    return model


class _Reader:
    """Reads checkpoint tensors by name, opening each safetensors file once."""

    def __init__(self, folder: Path, files: dict[str, Path]) -> None:
        self.folder, self.files, self.handles = folder, files, {}

    def __call__(self, name: str) -> torch.Tensor:
        if name not in self.files:  # some hub checkpoints (BLOOM, GPT-2) drop the base model's prefix
            name = name.partition(".")[2]
        if name not in self.files:
            raise ValueError(f"weight {name} missing from the checkpoint in {self.folder}")
        if self.files[name] not in self.handles:
            self.handles[self.files[name]] = safe_open(self.files[name], framework="pt", device="cpu")
        return self.handles[self.files[name]].get_tensor(name)


def _copy(name: str, param: torch.nn.Parameter, tensor: torch.Tensor) -> None:
    if tuple(tensor.shape) != tuple(param.shape):
        raise ValueError(f"weight {name} has shape {tuple(tensor.shape)} in the checkpoint, "
                         f"expected {tuple(param.shape)}")
    with torch.no_grad():
        param.copy_(tensor)
