"""T5 and mT5 (t5, flan-t5, mt5, mt0) encoder-decoders for the paged engine, with tensor parallelism.

Parameter names match HF checkpoints.  The encoder runs once per sequence,
over its whole input (bidirectional attention with T5's bucketed relative
position bias); `encode` returns, for every decoder layer, the cross-attention
keys and values of that encoder output, which the engine keeps with the
sequence (`seq2seq.py`).  The decoder runs on packed steps like a decoder-only
model: self-attention through the paged KV cache (`attend`, with the bias as
a per-distance table, T5's unscaled scores folded into the queries), then
cross-attention of each sequence's rows over its own encoder keys.  Under
tensor parallelism q/k/v, the relative bias tables and wi rows are split by
heads / rows, o and wo by columns followed by an all-reduce.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from services.worker.models.layers import ACTIVATIONS, RMSNorm, reduce_parallel
from services.worker.paged_attention import attend

MODEL_TYPES = ("t5", "mt5")
CrossKV = list[tuple[torch.Tensor, torch.Tensor]]  # per decoder layer: keys, values [n, heads, head_dim]


@dataclass(frozen=True)
class T5Args:
    """T5's config; `num_layers`, `num_kv_heads` and `head_dim` size the decoder's KV cache."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int  # decoder layers
    num_encoder_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_buckets: int
    max_distance: int
    norm_eps: float
    gated: bool
    activation: str
    scale_outputs: bool  # original T5 scales the decoder output by d_model^-0.5 before a tied LM head
    decoder_start_token_id: int

    @classmethod
    def from_config(cls, config: dict) -> T5Args:
        act = config.get("feed_forward_proj", "relu")
        gated = act.startswith("gated-")
        activation = "gelu_new" if act == "gated-gelu" else act.removeprefix("gated-")
        if activation not in ACTIVATIONS:
            raise ValueError(f"unsupported T5 feed_forward_proj {act!r}")
        return cls(
            vocab_size=config["vocab_size"], hidden_size=config["d_model"], intermediate_size=config["d_ff"],
            num_layers=config.get("num_decoder_layers") or config["num_layers"],
            num_encoder_layers=config["num_layers"], num_heads=config["num_heads"], num_kv_heads=config["num_heads"],
            head_dim=config["d_kv"], num_buckets=config.get("relative_attention_num_buckets", 32),
            max_distance=config.get("relative_attention_max_distance", 128),
            norm_eps=config.get("layer_norm_epsilon", 1e-6), gated=gated, activation=activation,
            # Original T5 scales before its tied head; T5 v1.1 configs say tie_word_embeddings false; mT5 never scales.
            scale_outputs=config["model_type"] != "mt5" and config.get(
                "scale_decoder_outputs", config.get("tie_word_embeddings", True) is not False),
            decoder_start_token_id=config.get("decoder_start_token_id") or 0,
        )


def relative_buckets(relative_position: torch.Tensor, bidirectional: bool, num_buckets: int,
                     max_distance: int) -> torch.Tensor:
    """T5's bucket of each relative position (key - query), exactly as transformers computes it."""
    buckets = 0
    if bidirectional:
        num_buckets //= 2
        buckets += (relative_position > 0).to(torch.long) * num_buckets
        relative_position = torch.abs(relative_position)
    else:
        relative_position = -torch.min(relative_position, torch.zeros_like(relative_position))
    max_exact = num_buckets // 2
    is_small = relative_position < max_exact
    large = max_exact + (torch.log(relative_position.float() / max_exact) / math.log(max_distance / max_exact)
                         * (num_buckets - max_exact)).to(torch.long)
    large = torch.min(large, torch.full_like(large, num_buckets - 1))
    return buckets + torch.where(is_small, relative_position, large)


class Attention(nn.Module):
    """q/k/v/o of this rank's heads (no biases, unscaled scores); the first layer of a stack owns the bias table."""

    def __init__(self, args: T5Args, world_size: int, group, relative_bias: bool) -> None:
        super().__init__()
        self.heads, self.d = args.num_heads // world_size, args.head_dim
        inner = self.heads * self.d
        self.q, self.k, self.v = (nn.Linear(args.hidden_size, inner, bias=False) for _ in range(3))
        self.o = nn.Linear(inner, args.hidden_size, bias=False)
        self.relative_attention_bias = nn.Embedding(args.num_buckets, self.heads) if relative_bias else None
        self.world_size, self.group = world_size, group

    def heads_of(self, x: torch.Tensor, proj: nn.Linear) -> torch.Tensor:
        return proj(x).view(x.shape[0], self.heads, self.d)

    def out(self, attended: torch.Tensor) -> torch.Tensor:
        return reduce_parallel(self.o(attended.reshape(attended.shape[0], -1)), None, self.world_size, self.group)


class FeedForward(nn.Module):
    def __init__(self, args: T5Args, world_size: int, group) -> None:
        super().__init__()
        inner = args.intermediate_size // world_size
        if args.gated:
            self.wi_0 = nn.Linear(args.hidden_size, inner, bias=False)
            self.wi_1 = nn.Linear(args.hidden_size, inner, bias=False)
        else:
            self.wi = nn.Linear(args.hidden_size, inner, bias=False)
        self.wo = nn.Linear(inner, args.hidden_size, bias=False)
        self.gated, self.act = args.gated, ACTIVATIONS[args.activation]
        self.world_size, self.group = world_size, group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.wi_0(x)) * self.wi_1(x) if self.gated else self.act(self.wi(x))
        return reduce_parallel(self.wo(h), None, self.world_size, self.group)


class SubLayer(nn.Module):
    """One pre-norm residual part of a block, named like HF's (`SelfAttention`, `EncDecAttention` or
    `DenseReluDense`, and `layer_norm`)."""

    def __init__(self, name: str, module: nn.Module, args: T5Args) -> None:
        super().__init__()
        setattr(self, name, module)
        self.layer_norm = RMSNorm(args.hidden_size, args.norm_eps)


def _block(args: T5Args, world_size: int, group, decoder: bool, first: bool) -> nn.Module:
    parts = [SubLayer("SelfAttention", Attention(args, world_size, group, relative_bias=first), args)]
    if decoder:
        parts.append(SubLayer("EncDecAttention", Attention(args, world_size, group, relative_bias=False), args))
    parts.append(SubLayer("DenseReluDense", FeedForward(args, world_size, group), args))
    block = nn.Module()
    block.layer = nn.ModuleList(parts)
    return block


def _stack(args: T5Args, count: int, world_size: int, group, decoder: bool) -> nn.Module:
    stack = nn.Module()
    stack.block = nn.ModuleList(_block(args, world_size, group, decoder, i == 0) for i in range(count))
    stack.final_layer_norm = RMSNorm(args.hidden_size, args.norm_eps)
    return stack


class T5ForConditionalGeneration(nn.Module):
    """The engine's encoder-decoder model: `encode(ids)` once per sequence, then `decode` on packed steps."""

    encoder_decoder = True

    def __init__(self, args: T5Args, rank: int = 0, world_size: int = 1, group=None) -> None:
        super().__init__()
        if args.num_heads % world_size or args.intermediate_size % world_size:
            raise ValueError(f"world_size {world_size} must divide attention heads ({args.num_heads}) "
                             f"and d_ff ({args.intermediate_size})")
        self.args, self.rank, self.world_size = args, rank, world_size
        self.kv_heads_per_rank = args.num_heads // world_size
        self.shared = nn.Embedding(args.vocab_size, args.hidden_size)
        self.encoder = _stack(args, args.num_encoder_layers, world_size, group, decoder=False)
        self.decoder = _stack(args, args.num_layers, world_size, group, decoder=True)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        self.register_buffer("distance_bias", None, persistent=False)

    def decoder_bias_table(self) -> torch.Tensor:
        """[heads, max_distance + 1] float32: the decoder self-attention bias by distance (query - key); farther
        keys all fall in the last bucket, so attention clamps distances to the last column."""
        distance = torch.arange(self.args.max_distance + 1, device=self.shared.weight.device)
        buckets = relative_buckets(-distance, False, self.args.num_buckets, self.args.max_distance)
        table = self.decoder.block[0].layer[0].SelfAttention.relative_attention_bias
        return table(buckets).float().T.contiguous()

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.shared(input_ids)

    def encode(self, x: torch.Tensor) -> CrossKV:
        """One sequence's encoder input embeddings [n, hidden] (`embed` of its ids, after any prompt prefix rows)
        -> each decoder layer's cross-attention keys and values."""
        n = x.shape[0]
        positions = torch.arange(n, device=x.device)
        buckets = relative_buckets(positions[None] - positions[:, None], True, self.args.num_buckets,
                                   self.args.max_distance)
        bias = self.encoder.block[0].layer[0].SelfAttention.relative_attention_bias(buckets).permute(2, 0, 1)
        bias = bias.to(x.dtype)[None]
        for block in self.encoder.block:
            part = block.layer[0]
            attn, h = part.SelfAttention, part.layer_norm(x)
            q, k, v = (attn.heads_of(h, p).transpose(0, 1)[None] for p in (attn.q, attn.k, attn.v))
            x = x + attn.out(F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)[0].transpose(0, 1))
            ff = block.layer[1]
            x = x + ff.DenseReluDense(ff.layer_norm(x))
        x = self.encoder.final_layer_norm(x)
        cross = [block.layer[1].EncDecAttention for block in self.decoder.block]
        return [(attn.heads_of(x, attn.k), attn.heads_of(x, attn.v)) for attn in cross]

    def decode(self, x: torch.Tensor, positions: torch.Tensor, segments: list[tuple[int, int, CrossKV]]) -> torch.Tensor:
        """Packed decoder input embeddings [T, hidden] and positions [T] -> final hidden states [T, hidden], inside
        `forward_context`; `segments` lists each sequence's rows (start, count) and its encoder keys/values."""
        scale = math.sqrt(self.args.head_dim)  # attend() divides scores by sqrt(d); T5 does not
        for i, block in enumerate(self.decoder.block):
            part = block.layer[0]
            attn, h = part.SelfAttention, part.layer_norm(x)
            q, k, v = (attn.heads_of(h, p) for p in (attn.q, attn.k, attn.v))
            x = x + attn.out(attend(q * scale, k, v, i, position_bias=self.distance_bias))
            part = block.layer[1]
            cross, h = part.EncDecAttention, part.layer_norm(x)
            q = cross.heads_of(h, cross.q)
            out = torch.empty_like(q)
            for start, count, kv in segments:
                keys, values = kv[i]
                rows = slice(start, start + count)
                out[rows] = F.scaled_dot_product_attention(
                    q[rows].transpose(0, 1)[None], keys.transpose(0, 1)[None], values.transpose(0, 1)[None],
                    scale=1.0)[0].transpose(0, 1)
            x = x + cross.out(out)
            ff = block.layer[2]
            x = x + ff.DenseReluDense(ff.layer_norm(x))
        return self.decoder.final_layer_norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.args.scale_outputs:
            hidden = hidden * self.args.hidden_size ** -0.5
        return self.lm_head(hidden).float()
