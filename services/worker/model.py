"""Llama-family causal LM in plain torch over a paged KV cache, with optional tensor parallelism.

A forward pass takes a step's tokens packed along one axis (decode tokens and
prefill chunks of many sequences together, `paged_attention.PagedBatch`
says which is which), so every linear layer runs once per step on all of
them.  After loading, q/k/v and gate/up are fused into one projection each.
Under tensor parallelism q/k/v/gate/up are split by output rows (whole heads),
o_proj/down_proj by input columns followed by an all-reduce; embeddings,
norms and lm_head are replicated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from services.worker.paged_attention import attend


@dataclass(frozen=True)
class ModelArgs:
    """The parts of a HF Llama config.json this implementation uses."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: dict
    attention_bias: bool
    mlp_bias: bool
    tie_word_embeddings: bool

    @classmethod
    def from_config(cls, config: dict) -> ModelArgs:
        if config.get("model_type", "llama") != "llama":
            raise ValueError(f"unsupported model_type {config.get('model_type')!r}: only Llama models are supported")
        if config.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {config['hidden_act']!r}")
        heads = config["num_attention_heads"]
        # rope_parameters is the transformers >= 5 name; older configs use rope_theta + rope_scaling.
        rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
        rope.setdefault("rope_theta", config.get("rope_theta", 10000.0))
        rope["rope_type"] = rope.get("rope_type", rope.get("type", "default"))
        rope.setdefault("original_max_position_embeddings", config.get("max_position_embeddings"))
        return cls(
            vocab_size=config["vocab_size"],
            hidden_size=config["hidden_size"],
            intermediate_size=config["intermediate_size"],
            num_layers=config["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
            rms_norm_eps=config.get("rms_norm_eps", 1e-6),
            rope=rope,
            attention_bias=config.get("attention_bias", False),
            mlp_bias=config.get("mlp_bias", False),
            tie_word_embeddings=config.get("tie_word_embeddings", False),
        )


def rope_inv_freq(args: ModelArgs) -> torch.Tensor:
    """Inverse rotary frequencies, computed exactly as transformers does (float32)."""
    dim = args.head_dim
    inv_freq = 1.0 / (args.rope["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    kind = args.rope["rope_type"]
    if kind == "default":
        return inv_freq
    if kind != "llama3":
        raise ValueError(f"unsupported rope type {kind!r}: only default and llama3 rope are implemented")
    factor, low, high = args.rope["factor"], args.rope["low_freq_factor"], args.rope["high_freq_factor"]
    old_context = args.rope["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < old_context / high) * ~(wavelen > old_context / low)
    return torch.where(is_medium, smoothed, scaled)


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


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _fuse(layers: list[nn.Linear]) -> nn.Linear:
    """One Linear computing the given layers' outputs concatenated (same input)."""
    weight = torch.cat([layer.weight.detach() for layer in layers])
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=layers[0].bias is not None,
                      device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        fused.weight.copy_(weight)
        if fused.bias is not None:
            fused.bias.copy_(torch.cat([layer.bias.detach() for layer in layers]))
    return fused.requires_grad_(False)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int, world_size: int, group) -> None:
        super().__init__()
        self.layer = layer
        self.heads = args.num_heads // world_size
        self.kv_heads = args.num_kv_heads // world_size
        self.head_dim = args.head_dim
        self.world_size, self.group = world_size, group
        bias = args.attention_bias
        # Loaded separately (checkpoint names), then fused into qkv_proj by fuse_projections().
        self.q_proj = nn.Linear(args.hidden_size, self.heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(args.hidden_size, self.kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(args.hidden_size, self.kv_heads * self.head_dim, bias=bias)
        self.qkv_proj: nn.Linear | None = None
        # The bias of a row-parallel layer is added once, after the all-reduce.
        self.o_proj = nn.Linear(self.heads * self.head_dim, args.hidden_size, bias=False)
        self.o_bias = nn.Parameter(torch.empty(args.hidden_size)) if bias else None

    def fuse(self) -> None:
        self.qkv_proj = _fuse([self.q_proj, self.k_proj, self.v_proj])
        del self.q_proj, self.k_proj, self.v_proj

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        t = x.shape[0]
        q_size, kv_size = self.heads * self.head_dim, self.kv_heads * self.head_dim
        q, k, v = self.qkv_proj(x).split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(t, self.heads, self.head_dim)
        k = k.view(t, self.kv_heads, self.head_dim)
        v = v.view(t, self.kv_heads, self.head_dim)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        out = attend(q, k, v, self.layer)
        out = self.o_proj(out.reshape(t, q_size))
        return _reduce(out, self.o_bias, self.world_size, self.group)


class MLP(nn.Module):
    def __init__(self, args: ModelArgs, world_size: int, group) -> None:
        super().__init__()
        self.inner = args.intermediate_size // world_size
        self.gate_proj = nn.Linear(args.hidden_size, self.inner, bias=args.mlp_bias)
        self.up_proj = nn.Linear(args.hidden_size, self.inner, bias=args.mlp_bias)
        self.gate_up_proj: nn.Linear | None = None
        self.down_proj = nn.Linear(self.inner, args.hidden_size, bias=False)
        self.down_bias = nn.Parameter(torch.empty(args.hidden_size)) if args.mlp_bias else None
        self.world_size, self.group = world_size, group

    def fuse(self) -> None:
        self.gate_up_proj = _fuse([self.gate_proj, self.up_proj])
        del self.gate_proj, self.up_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.inner, dim=-1)
        out = self.down_proj(F.silu(gate) * up)
        return _reduce(out, self.down_bias, self.world_size, self.group)


def _reduce(out: torch.Tensor, bias: torch.Tensor | None, world_size: int, group) -> torch.Tensor:
    """Sum a row-parallel layer's partial outputs across ranks, then add its bias."""
    if world_size > 1:
        torch.distributed.all_reduce(out, group=group)
    return out if bias is None else out + bias


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer: int, world_size: int, group) -> None:
        super().__init__()
        self.self_attn = Attention(args, layer, world_size, group)
        self.mlp = MLP(args, world_size, group)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, args: ModelArgs, world_size: int, group) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(args, i, world_size, group) for i in range(args.num_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    """The model; parameter names match HF checkpoints (`model.layers.N.self_attn.q_proj.weight`, ...)."""

    def __init__(self, args: ModelArgs, rank: int = 0, world_size: int = 1, group=None) -> None:
        super().__init__()
        if args.num_heads % world_size or args.num_kv_heads % world_size or args.intermediate_size % world_size:
            raise ValueError(
                f"world_size {world_size} must divide attention heads ({args.num_heads}), "
                f"KV heads ({args.num_kv_heads}) and intermediate_size ({args.intermediate_size})"
            )
        self.args, self.rank, self.world_size = args, rank, world_size
        self.model = Backbone(args, world_size, group)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(args), persistent=False)

    def fuse_projections(self) -> None:
        """Replace q/k/v by qkv_proj and gate/up by gate_up_proj in every layer (after loading)."""
        for layer in self.model.layers:
            layer.self_attn.fuse()
            layer.mlp.fuse()

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Packed input_ids/positions [T] -> final hidden states [T, hidden].

        Run inside `paged_attention.forward_context`: K/V go into its cache, at its batch's slots.
        """
        x = self.model.embed_tokens(input_ids)
        freqs = positions[:, None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        for layer in self.model.layers:
            x = layer(x, cos, sin)
        return self.model.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits [N, vocab] of hidden states [N, hidden]."""
        return self.lm_head(hidden).float()
