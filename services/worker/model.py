"""Llama-family causal LM in plain torch, with a slot-based KV cache and optional tensor parallelism.

Running sequences occupy cache slots 0..B-1 contiguously, so a decode step
attends over plain views `k[:B, :, :Lmax]` with a length mask, never a gather.
Prefill packs several sequences into one forward pass over all their tokens;
only attention goes sequence by sequence (on CPU a right-padded batch costs far
more on mixed lengths than the loop).  Under tensor parallelism q/k/v/gate/up
are split by output rows (whole heads), o_proj/down_proj by input columns
followed by an all-reduce; embeddings, norms and lm_head are replicated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


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


class KVCache:
    """Per-layer K/V tensors [max_batch, kv_heads, capacity, head_dim]; capacity doubles on demand."""

    def __init__(self, num_layers: int, max_batch: int, kv_heads: int, head_dim: int, max_len: int,
                 dtype: torch.dtype, device: torch.device, initial_capacity: int = 256) -> None:
        self.max_len = max_len
        self.capacity = min(initial_capacity, max_len)
        shape = (max_batch, kv_heads, self.capacity, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    def ensure_capacity(self, length: int) -> None:
        """Make room for `length` positions per slot (copying the cache when it has to grow)."""
        if length <= self.capacity:
            return
        if length > self.max_len:
            raise ValueError(f"sequence length {length} exceeds the KV cache limit {self.max_len}")
        capacity = self.capacity
        while capacity < length:
            capacity = min(capacity * 2, self.max_len)
        for cache in (self.k, self.v):
            for i, old in enumerate(cache):
                new = old.new_zeros(old.shape[0], old.shape[1], capacity, old.shape[3])
                new[:, :, : self.capacity] = old
                cache[i] = new
        self.capacity = capacity

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` positions of slot `src` into slot `dst`."""
        for cache in (self.k, self.v):
            for layer in cache:
                layer[dst, :, :length] = layer[src, :, :length]


@dataclass
class Context:
    """What every layer of one forward pass shares: rotary tables, where K/V go, what the queries attend to."""

    cos: torch.Tensor
    sin: torch.Tensor
    cache: KVCache
    index: tuple  # K/V destination of each token: (slots, :, positions), [N] tensors
    mask: torch.Tensor | None  # decode: [B, 1, 1, Lmax], True where a key exists
    lengths: list[int] | None  # prefill: token counts of the sequences packed along T


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int, world_size: int, group) -> None:
        super().__init__()
        self.layer = layer
        self.heads = args.num_heads // world_size
        self.kv_heads = args.num_kv_heads // world_size
        self.head_dim = args.head_dim
        self.world_size, self.group = world_size, group
        bias = args.attention_bias
        self.q_proj = nn.Linear(args.hidden_size, self.heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(args.hidden_size, self.kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(args.hidden_size, self.kv_heads * self.head_dim, bias=bias)
        # The bias of a row-parallel layer is added once, after the all-reduce.
        self.o_proj = nn.Linear(self.heads * self.head_dim, args.hidden_size, bias=False)
        self.o_bias = nn.Parameter(torch.empty(args.hidden_size)) if bias else None

    def forward(self, x: torch.Tensor, ctx: Context) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        q = q * ctx.cos + rotate_half(q) * ctx.sin
        k = k * ctx.cos + rotate_half(k) * ctx.sin
        k_cache, v_cache = ctx.cache.k[self.layer], ctx.cache.v[self.layer]
        # One scatter puts each token's K/V at its (slot, position): B decode tokens [B, 1] or T packed ones [1, T].
        k_cache[ctx.index], v_cache[ctx.index] = k.transpose(1, 2).flatten(0, 1), v.transpose(1, 2).flatten(0, 1)
        if ctx.lengths is not None:
            parts = zip(q.split(ctx.lengths, 2), k.split(ctx.lengths, 2), v.split(ctx.lengths, 2), strict=True)
            out = torch.cat([F.scaled_dot_product_attention(*part, is_causal=True, enable_gqa=True)
                             for part in parts], dim=2)
        else:
            span = ctx.mask.shape[-1]
            out = F.scaled_dot_product_attention(
                q, k_cache[:b, :, :span], v_cache[:b, :, :span], attn_mask=ctx.mask, enable_gqa=True
            )
        out = self.o_proj(out.transpose(1, 2).reshape(b, t, self.heads * self.head_dim))
        return _reduce(out, self.o_bias, self.world_size, self.group)


class MLP(nn.Module):
    def __init__(self, args: ModelArgs, world_size: int, group) -> None:
        super().__init__()
        inner = args.intermediate_size // world_size
        self.gate_proj = nn.Linear(args.hidden_size, inner, bias=args.mlp_bias)
        self.up_proj = nn.Linear(args.hidden_size, inner, bias=args.mlp_bias)
        self.down_proj = nn.Linear(inner, args.hidden_size, bias=False)
        self.down_bias = nn.Parameter(torch.empty(args.hidden_size)) if args.mlp_bias else None
        self.world_size, self.group = world_size, group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
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

    def forward(self, x: torch.Tensor, ctx: Context) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), ctx)
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

    def _run(self, input_ids: torch.Tensor, positions: torch.Tensor, cache: KVCache, index: tuple,
             mask: torch.Tensor | None, lengths: list[int] | None) -> torch.Tensor:
        """input_ids/positions: [B, T] -> final hidden states [B, T, hidden]."""
        x = self.model.embed_tokens(input_ids)
        freqs = positions[..., None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        ctx = Context(emb.cos().to(x.dtype)[:, None], emb.sin().to(x.dtype)[:, None], cache, index, mask, lengths)
        for layer in self.model.layers:
            x = layer(x, ctx)
        return self.model.norm(x)

    @torch.inference_mode()
    def prefill(self, sequences: list[torch.Tensor], cache: KVCache, slot: int,
                all_logits: list[bool]) -> list[torch.Tensor]:
        """Run sequences (1-D ids) in one pass into slots slot, slot + 1, ...; float32 logits per sequence.

        A sequence's logits are [T, vocab] where its `all_logits` is set, else [1, vocab] for its last token.
        """
        device, lengths = sequences[0].device, [s.shape[0] for s in sequences]
        sizes = torch.tensor(lengths, device=device)
        rows = torch.repeat_interleave(torch.arange(len(lengths), device=device), sizes, output_size=sum(lengths))
        positions = torch.cat([torch.arange(length, device=device) for length in lengths])
        index = (rows + slot, slice(None), positions)
        h = self._run(torch.cat(sequences)[None], positions[None], cache, index, None, lengths)[0]
        keep = torch.tensor(all_logits, device=device)[rows] | (positions == (sizes - 1)[rows])
        counts = [length if full else 1 for length, full in zip(lengths, all_logits, strict=True)]
        return list(self.lm_head(h[keep]).float().split(counts))

    @torch.inference_mode()
    def decode(self, input_ids: torch.Tensor, lengths: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One token for each of slots 0..B-1, whose caches hold `lengths` tokens; float32 logits [B, vocab]."""
        span = torch.arange(int(lengths.max()) + 1, device=lengths.device)
        mask = (span[None] <= lengths[:, None])[:, None, None]
        slots = torch.arange(input_ids.shape[0], device=input_ids.device)
        h = self._run(input_ids[:, None], lengths[:, None], cache, (slots, slice(None), lengths), mask, None)
        return self.lm_head(h[:, 0]).float()
