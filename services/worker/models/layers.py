"""Building blocks every decoder family is wired from: norms, rotary and ALiBi positions, attention, MLP, layer.

Each block owns its tensor-parallel shape: attention keeps this rank's query
heads and KV heads (an MQA / GQA model with fewer KV heads than ranks keeps
a copy of its group's KV head), the MLP this rank's share of the inner width,
and the output projections of both are row-parallel (all-reduce, then the
bias once).  Which checkpoint tensor fills which parameter, and how a fused
QKV of each layout is cut by heads, is `checkpoint.py`'s business.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from services.worker.paged_attention import attend


@dataclass(frozen=True)
class DecoderArgs:
    """One decoder-only architecture, as the traits its layers are built from (families fill it from config.json)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    norm: str = "rms"  # "rms" or "layer"
    norm_eps: float = 1e-6
    norm_bias: bool = True  # LayerNorm only
    position: str = "rope"  # "rope", "alibi" or "learned"
    rope: dict | None = None  # rope_theta, rope_type (default, linear, llama3) and its parameters
    rotary_dim: int = 0  # rotated dims of each head (partial rotary when below head_dim); 0: head_dim
    max_positions: int = 0  # learned positions
    alibi_bias_max: float = 8.0
    qkv_layout: str = "contiguous"  # fused QKV rows: "contiguous" (q, k, v) or "grouped" (per KV group: its q, k, v)
    qkv_bias: bool = False
    out_bias: bool = False
    qkv_clip: float | None = None
    gated_mlp: bool = True  # act(gate) * up, else act(up)
    activation: str = "silu"
    mlp_bias: bool = False
    residual: str = "sequential"  # "sequential", "parallel" (two norms) or "parallel_shared" (one norm for both)
    embed_norm: bool = False
    tie_word_embeddings: bool = False
    sliding_window: int | None = None  # keys each query sees (Mistral), in the layers listed in sliding_layers
    sliding_layers: tuple[int, ...] = ()

    def kv_heads_per_rank(self, world_size: int) -> int:
        """KV heads each rank holds: its share, or one copy of its group's head when there are fewer than ranks."""
        return max(1, self.num_kv_heads // world_size)

    def check_world_size(self, world_size: int) -> None:
        kv_ok = self.num_kv_heads % world_size == 0 or world_size % self.num_kv_heads == 0
        if self.num_heads % world_size or not kv_ok or self.intermediate_size % world_size:
            raise ValueError(
                f"world_size {world_size} must divide attention heads ({self.num_heads}) and intermediate_size "
                f"({self.intermediate_size}), and divide or be a multiple of KV heads ({self.num_kv_heads})")


def rope_inv_freq(rope: dict, dim: int) -> torch.Tensor:
    """Inverse rotary frequencies of `dim` rotated dims, computed exactly as transformers does (float32)."""
    inv_freq = 1.0 / (rope["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    kind = rope.get("rope_type", "default")
    if kind == "default":
        return inv_freq
    if kind == "linear":  # positions divided by the factor
        return inv_freq / rope["factor"]
    if kind != "llama3":
        raise ValueError(f"unsupported rope type {kind!r}: only default, linear and llama3 rope are implemented")
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old_context = rope["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < old_context / high) * ~(wavelen > old_context / low)
    return torch.where(is_medium, smoothed, scaled)


def alibi_slopes(num_heads: int, bias_max: float = 8.0) -> torch.Tensor:
    """Per-head ALiBi slopes [num_heads] (float32): BLOOM's and MPT's recipes give the same values."""
    power = 2 ** math.ceil(math.log2(num_heads))
    slopes = 1.0 / torch.pow(2, torch.arange(1, power + 1, dtype=torch.int64).float() * (bias_max / power))
    if power != num_heads:  # the odd-indexed slopes of the next power of two come first
        slopes = torch.cat([slopes[1::2], slopes[::2]])[:num_heads]
    return slopes


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalize in float32 like the reference implementation, whatever the weights dtype.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def make_norm(args: DecoderArgs) -> nn.Module:
    if args.norm == "rms":
        return RMSNorm(args.hidden_size, args.norm_eps)
    return nn.LayerNorm(args.hidden_size, eps=args.norm_eps, bias=args.norm_bias)


ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "relu": F.relu,
    # transformers' gelu_new, gelu_fast, gelu_pytorch_tanh and BLOOM's gelu are all the tanh approximation.
    **dict.fromkeys(("gelu_new", "gelu_fast", "gelu_pytorch_tanh", "bloom_gelu"),
                    lambda x: F.gelu(x, approximate="tanh")),
}


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first cos.shape[-1] dims of every head of x [T, heads, d] (GPT-NeoX style halves)."""
    dim = cos.shape[-1]
    if dim == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    rot, rest = x[..., :dim], x[..., dim:]
    return torch.cat((rot * cos + rotate_half(rot) * sin, rest), dim=-1)


def reduce_parallel(out: torch.Tensor, bias: torch.Tensor | None, world_size: int, group) -> torch.Tensor:
    """Sum a row-parallel layer's partial outputs across ranks, then add its bias."""
    if world_size > 1:
        torch.distributed.all_reduce(out, group=group)
    return out if bias is None else out + bias


class Attention(nn.Module):
    """Self-attention through the paged cache: one fused QKV projection, rotary or ALiBi, row-parallel output."""

    def __init__(self, args: DecoderArgs, layer: int, world_size: int, group) -> None:
        super().__init__()
        self.layer = layer
        self.heads = args.num_heads // world_size
        self.kv_heads = args.kv_heads_per_rank(world_size)
        self.head_dim = args.head_dim
        self.world_size, self.group, self.clip = world_size, group, args.qkv_clip
        self.q_size, self.kv_size = self.heads * self.head_dim, self.kv_heads * self.head_dim
        self.qkv_proj = nn.Linear(args.hidden_size, self.q_size + 2 * self.kv_size, bias=args.qkv_bias)
        # The bias of a row-parallel layer is added once, after the all-reduce.
        self.o_proj = nn.Linear(self.q_size, args.hidden_size, bias=False)
        self.o_bias = nn.Parameter(torch.empty(args.hidden_size)) if args.out_bias else None
        self.window = args.sliding_window if layer in args.sliding_layers else None

    def forward(self, x: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None,
                slopes: torch.Tensor | None) -> torch.Tensor:
        t = x.shape[0]
        qkv = self.qkv_proj(x)
        if self.clip is not None:
            qkv = qkv.clamp(-self.clip, self.clip)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(t, self.heads, self.head_dim)
        k = k.view(t, self.kv_heads, self.head_dim)
        v = v.view(t, self.kv_heads, self.head_dim)
        if cos is not None:
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = attend(q, k, v, self.layer, slopes, sliding_window=self.window)
        out = self.o_proj(out.reshape(t, self.q_size))
        return reduce_parallel(out, self.o_bias, self.world_size, self.group)


class MLP(nn.Module):
    """act(gate) * up (gate and up fused into one projection) or act(up), then a row-parallel down projection."""

    def __init__(self, args: DecoderArgs, world_size: int, group) -> None:
        super().__init__()
        self.inner = args.intermediate_size // world_size
        self.gated = args.gated_mlp
        self.act = ACTIVATIONS[args.activation]
        width = 2 * self.inner if self.gated else self.inner
        self.up_proj = nn.Linear(args.hidden_size, width, bias=args.mlp_bias)
        self.down_proj = nn.Linear(self.inner, args.hidden_size, bias=False)
        self.down_bias = nn.Parameter(torch.empty(args.hidden_size)) if args.mlp_bias else None
        self.world_size, self.group = world_size, group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up_proj(x)
        if self.gated:
            gate, up = h.split(self.inner, dim=-1)
            h = self.act(gate) * up
        else:
            h = self.act(h)
        return reduce_parallel(self.down_proj(h), self.down_bias, self.world_size, self.group)


class DecoderLayer(nn.Module):
    """Pre-norm block; sequential (x + attn, then + mlp) or parallel (x + attn + mlp, one or two norms)."""

    def __init__(self, args: DecoderArgs, layer: int, world_size: int, group) -> None:
        super().__init__()
        self.residual = args.residual
        self.attn = Attention(args, layer, world_size, group)
        self.mlp = MLP(args, world_size, group)
        self.attn_norm = make_norm(args)
        self.mlp_norm = None if args.residual == "parallel_shared" else make_norm(args)

    def forward(self, x: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None,
                slopes: torch.Tensor | None) -> torch.Tensor:
        h = self.attn_norm(x)
        if self.residual == "sequential":
            x = x + self.attn(h, cos, sin, slopes)
            return x + self.mlp(self.mlp_norm(x))
        mlp_in = h if self.mlp_norm is None else self.mlp_norm(x)
        return x + self.attn(h, cos, sin, slopes) + self.mlp(mlp_in)
