"""The worker's LoRA adapters: which layers take them, loading a PEFT adapter as this rank's shard, and the LRU.

Our layers fuse what checkpoints keep apart (q/k/v into `attn.qkv_proj`,
gate/up into `mlp.up_proj`), so a fused layer's adapter is the concatenation
of its parts': A stacked [r_q + r_k + r_v, in], B block-diagonal (each
part's B, times its scale, in its own rows and rank columns; a part the
adapter does not target is zeros).  Tensor parallelism splits them as the
base layer is split, through the checkpoint loader's own `shard_tensor`:
column-parallel layers (QKV by heads, gate/up by rows) split B by output
rows and keep A whole; row-parallel ones (o, down) split A by input columns
and keep B whole, and the all-reduce after the base layer sums the partial
deltas with the partial outputs.

`LoraCache` keeps at most MAX_LORAS adapters loaded, least recently used
evicted first, never one a running sequence uses (the sequence holds its
weights; the scheduler admits at most MAX_LORAS distinct adapters into the
running batch); an evicted adapter is loaded again when a new sequence asks.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from services.common.lora_adapters import (
    LORA_KEY,
    PEFT_PREFIX,
    AdapterError,
    AdapterFiles,
    check_fit,
    find_adapter,
)
from services.worker.checkpoint import shard_tensor
from services.worker.lora_layers import LoraWeights, wrap_linears
from services.worker.models.decoder import DecoderLM
from services.worker.models.layers import DecoderArgs
from services.worker.models.registry import MODEL_TYPES, family

logger = logging.getLogger(__name__)

LORA_FAMILIES = ("llama",)  # family modules whose layers LoRA is tested on (llama, mistral, qwen2)
ROW_PARALLEL = ("attn.o_proj", "mlp.down_proj")  # split by input columns, all-reduced after (checkpoint.shard_tensor)
NOT_SERVED = ("LoRA adapters are served on tgis_native {} models only"
              .format(", ".join(t for t, f in MODEL_TYPES.items() if f in LORA_FAMILIES)))


@dataclass(frozen=True)
class LoraPlan:
    """Where adapters go in this model: our layer name -> its checkpoint parts as (module name, in, out)."""

    args: DecoderArgs
    layers: dict[str, list[tuple[str, int, int]]]

    @classmethod
    def for_model(cls, model: torch.nn.Module, model_path: Path) -> LoraPlan:
        """The plan for a `tgis_native` decoder of a LoRA family; ValueError saying what is served otherwise."""
        model_type = json.loads((model_path / "config.json").read_text()).get("model_type")
        if not isinstance(model, DecoderLM) or MODEL_TYPES.get(model_type) not in LORA_FAMILIES:
            raise ValueError(f"{NOT_SERVED}, not on {model_type} ({type(model).__name__})")
        args = model.args
        modules = family(model_type).modules(args)
        q, kv, inner = args.num_heads * args.head_dim, args.num_kv_heads * args.head_dim, args.intermediate_size
        sizes = {"attn.qkv_proj": [(args.hidden_size, q), (args.hidden_size, kv), (args.hidden_size, kv)],
                 "attn.o_proj": [(q, args.hidden_size)],
                 "mlp.up_proj": [(args.hidden_size, inner)] * (2 if args.gated_mlp else 1),
                 "mlp.down_proj": [(inner, args.hidden_size)]}
        layers = {}
        for i in range(args.num_layers):
            for ours, parts in sizes.items():
                source = modules[f"model.layers.{{i}}.{ours}"]
                names = source if isinstance(source, tuple) else (source,)
                layers[f"model.layers.{i}.{ours}"] = [(n.format(i=i), a, b) for n, (a, b) in zip(names, parts, strict=True)]
        return cls(args, layers)

    @property
    def leaf_shapes(self) -> dict[str, list[int]]:
        """Checkpoint leaf name (q_proj, ...) -> [in, out] of the full layer: what `check_fit` compares with."""
        return {name.rpartition(".")[2]: [a, b] for parts in self.layers.values() for name, a, b in parts}


def lora_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """What LoRA's matmuls run in: the activation dtype on accelerators; float32 on CPU, where a bfloat16 matmul of
    [T, 576] x [576, 8] took ~1.6 ms against ~11 us in float32 (2 cores, torch 2.13), which made a rank-8 adapter
    cost +88% per bfloat16 token at batch 1 (bench/lora_cost.py)."""
    return torch.float32 if device.type == "cpu" else dtype


def _scale(config, module: str, rank: int) -> float:
    """PEFT's scaling of one module: its alpha (alpha_pattern or lora_alpha) over r, or over sqrt(r) (rsLoRA)."""
    from peft.utils.other import get_pattern_key

    alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), module), config.lora_alpha)
    return alpha / math.sqrt(rank) if config.use_rslora else alpha / rank


def load_adapter(files: AdapterFiles, plan: LoraPlan, dtype: torch.dtype, device: torch.device, rank: int = 0,
                 world_size: int = 1) -> LoraWeights:
    """This rank's shard of the adapter, read with PEFT's own loader and config; AdapterError if it does not fit."""
    from peft import LoraConfig
    from peft.utils import load_peft_weights

    state = load_peft_weights(str(files.folder), device="cpu")
    check_fit(files.adapter_id, {k: list(v.shape) for k, v in state.items()}, plan.leaf_shapes)
    config = LoraConfig.from_pretrained(str(files.folder))
    halves = {}
    for key, tensor in state.items():
        module, half = LORA_KEY.fullmatch(key.removeprefix(PEFT_PREFIX)).groups()
        halves[module, half] = tensor.float()
    targets = {module for parts in plan.layers.values() for module, _, _ in parts}
    if stray := sorted({module for module, _ in halves} - targets):  # e.g. a layer this model does not have
        raise AdapterError(f"can't load adapter with id '{files.adapter_id}': {stray[0]} is not a layer of this model")
    weights = LoraWeights(files.adapter_id)
    for name, parts in plan.layers.items():
        present = [(module, halves.get((module, "A")), halves.get((module, "B"))) for module, _, _ in parts]
        if all(a is None for _, a, _ in present):
            continue
        ranks = [0 if a is None else a.shape[0] for _, a, _ in present]
        total, offset, b_parts = sum(ranks), 0, []
        fan_in = parts[0][1]
        a_full = torch.cat([torch.zeros(0, fan_in) if a is None else a for _, a, _ in present])
        for (module, a, b), r, (_, _, fan_out) in zip(present, ranks, parts, strict=True):
            block = torch.zeros(fan_out, total)
            if a is not None:
                block[:, offset: offset + r] = b * _scale(config, module, r)
            b_parts.append(block)
            offset += r
        if name.endswith(ROW_PARALLEL):
            a_rank, b_rank = shard_tensor(name + ".weight", [a_full], plan.args, rank, world_size), b_parts[0]
        else:
            a_rank, b_rank = a_full, shard_tensor(name + ".weight", b_parts, plan.args, rank, world_size)
        weights.layers[name] = (a_rank.t().to(device, dtype).contiguous(), b_rank.t().to(device, dtype).contiguous())
    return weights


class LoraCache:
    """The adapters loaded on this rank: at most `max_loras` kept, least recently used evicted first."""

    def __init__(self, root: str | Path, plan: LoraPlan, max_loras: int, dtype: torch.dtype, device: torch.device,
                 rank: int = 0, world_size: int = 1) -> None:
        if max_loras < 1:
            raise ValueError(f"MAX_LORAS must be at least 1, got {max_loras}")
        self.root, self.plan, self.max_loras = Path(root), plan, max_loras
        self.dtype, self.device, self.rank, self.world_size = lora_dtype(dtype, device), device, rank, world_size
        self._loaded: OrderedDict[str, LoraWeights] = OrderedDict()
        self.loads = self.evictions = 0

    @property
    def loaded(self) -> list[str]:
        """Ids of the loaded adapters, least recently used first."""
        return list(self._loaded)

    def get(self, adapter_id: str, in_use: set[str] = frozenset()) -> LoraWeights:
        """The adapter, loaded if needed (evicting the least recently used not `in_use`); AdapterError otherwise."""
        if adapter_id in self._loaded:
            self._loaded.move_to_end(adapter_id)
            return self._loaded[adapter_id]
        started = time.monotonic()
        try:
            weights = load_adapter(find_adapter(self.root, adapter_id), self.plan, self.dtype, self.device,
                                   self.rank, self.world_size)
        except AdapterError:
            raise
        except Exception as exc:  # unreadable files, torch or PEFT refusing them: the request fails, not the step
            raise AdapterError(f"can't load adapter with id '{adapter_id}': {exc}") from exc
        self._loaded[adapter_id] = weights
        self.loads += 1
        for victim in [k for k in self._loaded if k not in in_use and k != adapter_id]:
            if len(self._loaded) <= self.max_loras:
                break
            del self._loaded[victim]
            self.evictions += 1
            logger.info("LoRA adapter %s evicted (MAX_LORAS %d)", victim, self.max_loras)
        logger.info("LoRA adapter %s loaded in %.2f s (%d layers, %.1f MiB)", adapter_id, time.monotonic() - started,
                    len(weights.layers), weights.nbytes / 2**20)
        return weights


def open_loras(root: str | None, max_loras: int, model: torch.nn.Module, model_path: Path, dtype: torch.dtype,
               device: torch.device, rank: int = 0, world_size: int = 1) -> LoraCache | None:
    """This rank's adapter cache, its model's layers wrapped for LoRA; None without ADAPTER_CACHE or when the model
    takes no adapters (logged; requests naming one are then refused at the gateway)."""
    if not root:
        return None
    try:
        plan = LoraPlan.for_model(model, model_path)
    except ValueError as exc:
        logger.warning("ADAPTER_CACHE is set but %s: adapter_id requests will be refused", exc)
        return None
    wrap_linears(model, list(plan.layers))
    logger.info("LoRA adapters from %s (at most %d loaded)", root, max_loras)
    return LoraCache(root, plan, max_loras, dtype, device, rank, world_size)
