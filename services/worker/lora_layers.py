"""Per-row LoRA in a forward pass: linear layers wrapped to add scale * B(A(x)) for the rows of each adapter.

A step packs the tokens of many sequences along one axis; each sequence
uses at most one adapter.  The engine groups the packed rows by adapter
(`LoraBatch.build`) and sets the group list around the forward pass
(`lora_context`), as `paged_attention.forward_context` does for the KV
cache, so model code stays unaware of LoRA.  Each wrapped layer then adds,
per adapter in the step, `(x[rows] A^T) B^T` to its output rows: one
`index_select`, two small matmuls and one `index_add_` per adapter and layer
(no gather when one adapter covers every row).  The scale is already in B.

Rows without an adapter cost nothing: a step where no row has one sets no
context, and a wrapped layer is then its base layer plus one global read.
The base layer may be float, int8 or int4 (`quant.py`): LoRA reads the
layer's input and adds to its output in the activation dtype, whatever the
weights; its own two matmuls run in the adapter's dtype (`lora.lora_dtype`:
float32 on CPU, where bfloat16 matmuls this thin cost ~100x more).

What a GPU kernel would change: punica's BGMV (decode) and SGMV (prefill
segments) kernels do the same per-row work in one launch per layer for all
adapters, reading each row's A/B through an index instead of the Python loop
over adapters and the index_select/index_add_ copies here; with many
adapters per step that saves launches and copies, with one it is the same
two matmuls.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass(eq=False)
class LoraWeights:
    """One loaded adapter on one rank: per wrapped layer name, (A^T [in, r], B^T [r, out] with the scale in it),
    both this rank's shard, in the dtype LoRA computes in."""

    adapter_id: str
    layers: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for pair in self.layers.values() for t in pair)


@dataclass
class LoraBatch:
    """The step's adapters and, for each, the packed rows using it (None: every row)."""

    groups: list[tuple[LoraWeights, torch.Tensor | None]]

    @classmethod
    def build(cls, runs: list[tuple[LoraWeights | None, int]], device: torch.device) -> LoraBatch | None:
        """From each packed run's (adapter or None, token count) in packing order; None when no run has one."""
        rows: dict[LoraWeights, list[int]] = {}
        start = 0
        for weights, count in runs:
            if weights is not None:
                rows.setdefault(weights, []).extend(range(start, start + count))
            start += count
        if not rows:
            return None
        return cls([(w, None if len(r) == start else torch.tensor(r, device=device)) for w, r in rows.items()])

    def apply(self, name: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y (the base layer's output for input x) plus each adapter's delta on its rows."""
        for weights, rows in self.groups:
            pair = weights.layers.get(name)
            if pair is None:  # this adapter does not target this layer
                continue
            a_t, b_t = pair
            if rows is None:
                y = y + ((x.to(a_t.dtype) @ a_t) @ b_t).to(y.dtype)
            else:  # in place: y is the layer's own output
                y = y.index_add_(0, rows, ((x.index_select(0, rows).to(a_t.dtype) @ a_t) @ b_t).to(y.dtype))
        return y


_active: LoraBatch | None = None


@contextmanager
def lora_context(batch: LoraBatch | None) -> Iterator[None]:
    """Make `batch` the LoRA rows of the forward pass run inside (None: no LoRA this step)."""
    global _active
    previous, _active = _active, batch
    try:
        yield
    finally:
        _active = previous


class LoraLinear(nn.Module):
    """A linear layer (float or quantized) plus the step's LoRA deltas; `name` keys the adapters' weights."""

    def __init__(self, base: nn.Module, name: str) -> None:
        super().__init__()
        self.base, self.name = base, name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if _active is None:
            return y
        return _active.apply(self.name, x, y)


def wrap_linears(model: nn.Module, names: list[str]) -> None:
    """Replace each named linear layer of `model` by a LoraLinear around it, in place."""
    for name in names:
        parent, _, attr = name.rpartition(".")
        module = model.get_submodule(parent)
        setattr(module, attr, LoraLinear(getattr(module, attr), name))
