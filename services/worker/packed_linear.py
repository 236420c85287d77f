"""Linear layers whose bfloat16 weights are prepacked once for oneDNN, on CPU.

Why: torch 2.13's bfloat16 `linear` on CPU reorders each weight into oneDNN's blocked layout on
every call. Packed once at load (as inductor's weight-prepack pass does under freezing), the demo
model's 121 projections read in 12.8 ms instead of 20.3 at one row, 16.4 instead of 22.5 at 32
rows (AVX512-BF16 + AMX machine), with bit-identical results. float32 is left alone: its packed
kernel is slower at one row, and its results would differ in the last bits.
"""

from __future__ import annotations

import logging
from collections.abc import Collection

import torch
from torch import nn

logger = logging.getLogger(__name__)

BATCH_HINT = 32  # the row count oneDNN tunes the blocked layout for; measured best from 1 to 64 rows


class PackedLinear(nn.Module):
    """y = x W^T (+ b) with W held in oneDNN's blocked bfloat16 layout (opaque: only this module reads it)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight", torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), BATCH_HINT))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Eager only: inductor lowers this op on weights it packed itself (compiled models freeze instead).
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")


def packed_linears_supported(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether `pack_linear_layers` applies: bfloat16 on a CPU where oneDNN runs bfloat16."""
    return (device.type == "cpu" and dtype == torch.bfloat16 and torch.backends.mkldnn.is_available()
            and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def pack_linear_layers(model: nn.Module, dtype: torch.dtype, device: torch.device,
                       names: Collection[str] | None = None) -> int:
    """Replace the float `nn.Linear` layers of a bfloat16 CPU model (those in `names` only, if given) by
    `PackedLinear`, in place; returns how many."""
    if not packed_linears_supported(dtype, device):
        return 0
    targets = [name for name, module in model.named_modules()
               if type(module) is nn.Linear and (names is None or name in names)]
    for name in targets:
        parent, _, attr = name.rpartition(".")
        owner = model.get_submodule(parent)
        setattr(owner, attr, PackedLinear(getattr(owner, attr)))
    logger.info("%d bfloat16 linear layers prepacked for oneDNN", len(targets))
    return len(targets)
