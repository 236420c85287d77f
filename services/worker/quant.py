"""Weight-only int8 / int4 quantization of a model's `nn.Linear` layers, on torch's own CPU and CUDA kernels.

Why torch's ops and not torchao: torchao 0.18 on torch 2.13 CPU was measured
7x slower than `aten._weight_int8pack_mm` at batch 1 (its int8 path
dequantizes; 70x on the 576x49152 lm_head) and has no CPU int4 layout left.

Formats (both weight-only; activations are cast to bfloat16 around the matmul
and the result back to the caller's dtype, because the CPU int8 kernel is ~10x
slower on float32 activations and the int4 kernels want bfloat16):
* `int8`: symmetric, one scale per output channel.
* `int4`: asymmetric, one (scale, zero) pair per `group_size` input columns,
  stored as tinygemm expects: w ~ (q - 8) * scale + zero, q in [0, 15].

Tensor parallelism: quantize each rank's shard after loading it; a group never
straddles two shards as long as the shard's input width is a multiple of the
group size (otherwise a smaller group size is used for that layer).
"""

from __future__ import annotations

import logging
import time

import torch
from torch import nn

from services.worker.config import quantize_method

logger = logging.getLogger(__name__)

COMPUTE_DTYPE = torch.bfloat16
DEFAULT_GROUP_SIZE = 32  # best greedy agreement on the demo model (README: weight formats)
# The output layer (tied to the embedding in the demo model) suffers most from 4 bits, so it is int8 under both
# methods. Demo model, int4 elsewhere (fp32 perplexity 18.32 on bench/data/quality_text.txt): head in int4 19.37,
# in int8 18.36, in bfloat16 18.33; the int8 head reads half the bytes of a bfloat16 one (~2 ms of a 15 ms step).
OUTPUT_LAYER_METHOD = {"int8": "int8", "int4": "int8"}
MIN_GROUP_SIZE = 32


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).to(COMPUTE_DTYPE)


def _finish(out: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The [M, N] kernel output shaped like `x`, plus the bias, in `x`'s dtype."""
    out = out.reshape(*x.shape[:-1], out.shape[-1])
    return (out if bias is None else out + bias).to(x.dtype)


class Int8Linear(nn.Module):
    """y = x W^T (+ b) with W stored as int8 rows and one bfloat16 scale per row."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        w = weight.detach().float()
        scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-8)
        self.register_buffer("weight", torch.round(w / scales[:, None]).clamp(-128, 127).to(torch.int8))
        self.register_buffer("scales", scales.to(COMPUTE_DTYPE))
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _finish(torch.ops.aten._weight_int8pack_mm(_flat(x), self.weight, self.scales), x, self.bias)


def pack_int4_cuda(q: torch.Tensor) -> torch.Tensor:
    """[N, K] values in [0, 15] -> [N, K/2] uint8, two per byte (even column high), the input of
    `aten._convert_weight_to_int4pack` (CUDA tinygemm)."""
    return (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)


def _inner_k_tiles(in_features: int) -> int:
    """CUDA tinygemm's tiling of K: the largest of 8, 4, 2 with K a multiple of 16 x tiles."""
    return next(t for t in (8, 4, 2) if in_features % (16 * t) == 0)


def int4_group_size(in_features: int, wanted: int) -> int | None:
    """`wanted`, halved until it divides `in_features` (not below 32); None when nothing fits."""
    size = wanted
    while size >= MIN_GROUP_SIZE:
        if in_features % size == 0:
            return size
        size //= 2
    return None


class Int4Linear(nn.Module):
    """y = x W^T (+ b) with W as 4-bit values, a (scale, zero) pair per `group_size` columns, packed for
    the weight's device kernel (`_weight_int4pack_mm_for_cpu` on CPU, tinygemm `_weight_int4pack_mm` on CUDA)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, group_size: int) -> None:
        super().__init__()
        n, k = weight.shape
        if k % group_size or group_size < MIN_GROUP_SIZE:
            raise ValueError(f"group size {group_size} does not divide in_features {k}")
        self.in_features, self.out_features, self.group_size = k, n, group_size
        groups = weight.detach().float().reshape(n, k // group_size, group_size)
        low, high = groups.amin(dim=-1), groups.amax(dim=-1)
        scales = ((high - low) / 15).clamp(min=1e-8)
        q = torch.round((groups - low[..., None]) / scales[..., None]).clamp(0, 15).to(torch.int32).reshape(n, k)
        # tinygemm's zero is the value of q = 8, the middle of the range.
        zeros = low + 8 * scales
        self.register_buffer("scales_and_zeros", torch.stack([scales, zeros], dim=-1).transpose(0, 1)
                             .contiguous().to(COMPUTE_DTYPE))  # [K / group, N, 2]
        if weight.device.type == "cuda":
            self.register_buffer("weight", torch.ops.aten._convert_weight_to_int4pack(
                pack_int4_cuda(q), _inner_k_tiles(k)))
        else:
            self.register_buffer("weight", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1))
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def _mm(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.device.type == "cuda":
            return torch.ops.aten._weight_int4pack_mm(x, self.weight, self.group_size, self.scales_and_zeros)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.weight, self.group_size, self.scales_and_zeros)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _finish(self._mm(_flat(x)), x, self.bias)


def quantized_linear(linear: nn.Linear, method: str, group_size: int = DEFAULT_GROUP_SIZE) -> nn.Module | None:
    """The quantized replacement of `linear`, or None when its shape does not allow `method`."""
    if method == "int8":
        return Int8Linear(linear.weight, linear.bias)
    size = int4_group_size(linear.in_features, group_size)
    if size is None or linear.out_features % 16:  # the CPU int4 packing wants rows in 16s (CUDA: 8s)
        return None
    return Int4Linear(linear.weight, linear.bias, size)


def quantize_model(model: nn.Module, method: str | None, group_size: int = DEFAULT_GROUP_SIZE,
                   overrides: dict[str, str | None] | None = None) -> int:
    """Replace every `nn.Linear` of `model` by its `method` counterpart, in place; returns how many were replaced.

    `overrides` maps module names to another method (None: keep that module in float); by default `lm_head`
    follows OUTPUT_LAYER_METHOD. `method` None or "none" leaves the model as it is.
    """
    method = quantize_method(method)
    if method is None:
        return 0
    overrides = {"lm_head": OUTPUT_LAYER_METHOD[method]} if overrides is None else overrides
    started = time.monotonic()
    targets = [(name, module, quantize_method(overrides.get(name, method))) for name, module in model.named_modules()
               if isinstance(module, nn.Linear)]
    logger.info("Quantizing %d linear layers to %s weights (group size %s; overrides %s)", len(targets), method,
                group_size if method == "int4" else "-", overrides or "none")
    replaced = 0
    for name, linear, chosen in targets:
        new = None if chosen is None else quantized_linear(linear, chosen, group_size)
        if new is None:
            if chosen is not None:
                logger.warning("%s kept unquantized: its shape %s does not fit %s", name,
                               tuple(linear.weight.shape), chosen)
            continue
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, new)
        replaced += 1
    logger.info("Quantized %d of %d linear layers to %s in %.1f s", replaced, len(targets), method,
                time.monotonic() - started)
    return replaced
