"""The decoder-only causal LM every `tgis_native` decoder family runs as: embeddings, layers, norm, LM head.

A forward pass takes a step's tokens packed along one axis (decode tokens and
prefill chunks of many sequences together; `paged_attention.PagedBatch`
says which is which), so every linear layer runs once per step on all of
them.  Families differ only in `DecoderArgs` (norms, positions, MLP,
residual) and in checkpoint names (`models/<family>.py`).  Under tensor
parallelism QKV and the MLP's up projections are split by output rows
(whole heads), the output projections by input columns followed by an
all-reduce; embeddings, norms and the LM head are replicated.
"""

from __future__ import annotations

import torch
from torch import nn

from services.worker.models.layers import DecoderArgs, DecoderLayer, alibi_slopes, make_norm, rope_inv_freq


class Backbone(nn.Module):
    def __init__(self, args: DecoderArgs, world_size: int, group) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.embed_positions = nn.Embedding(args.max_positions, args.hidden_size) \
            if args.position == "learned" else None
        self.embed_norm = make_norm(args) if args.embed_norm else None
        self.layers = nn.ModuleList(DecoderLayer(args, i, world_size, group) for i in range(args.num_layers))
        self.norm = make_norm(args)


class DecoderLM(nn.Module):
    """The model behind the engine: `forward(input_ids, positions)` -> hidden states, `logits(hidden)`."""

    def __init__(self, args: DecoderArgs, rank: int = 0, world_size: int = 1, group=None) -> None:
        super().__init__()
        args.check_world_size(world_size)
        self.args, self.rank, self.world_size = args, rank, world_size
        self.kv_heads_per_rank = args.kv_heads_per_rank(world_size)
        # Learned position embeddings bound the sequence length (the engine refuses a longer MAX_SEQUENCE_LENGTH).
        self.max_positions = args.max_positions if args.position == "learned" else None
        self.model = Backbone(args, world_size, group)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", self.rotary_inv_freq(), persistent=False)
        self.register_buffer("alibi_slopes", self.rank_alibi_slopes(), persistent=False)

    def rotary_inv_freq(self) -> torch.Tensor | None:
        """float32 inverse frequencies of the rotated dims (None without rotary positions); kept float32 after
        loading, like the reference."""
        if self.args.position != "rope":
            return None
        return rope_inv_freq(self.args.rope, self.args.rotary_dim or self.args.head_dim)

    def rank_alibi_slopes(self) -> torch.Tensor | None:
        """float32 ALiBi slopes of this rank's heads (None without ALiBi)."""
        if self.args.position != "alibi":
            return None
        heads = self.args.num_heads // self.world_size
        return alibi_slopes(self.args.num_heads, self.args.alibi_bias_max)[self.rank * heads: (self.rank + 1) * heads]

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings [T, hidden] of input_ids [T] (prompt prefixes replace some rows of these)."""
        return self.model.embed_tokens(input_ids)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Packed input_ids/positions [T] -> final hidden states [T, hidden].

        Run inside `paged_attention.forward_context`: K/V go into its cache, at its batch's slots.
        """
        return self.forward_embeds(self.embed(input_ids), positions)

    def forward_embeds(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """As `forward`, from input embeddings x [T, hidden]."""
        backbone = self.model
        if backbone.embed_positions is not None:
            x = x + backbone.embed_positions(positions)
        if backbone.embed_norm is not None:
            x = backbone.embed_norm(x)
        cos = sin = None
        if self.inv_freq is not None:
            freqs = positions[:, None].float() * self.inv_freq
            emb = torch.cat((freqs, freqs), dim=-1)[:, None]
            cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        for layer in backbone.layers:
            x = layer(x, cos, sin, self.alibi_slopes)
        return backbone.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits [N, vocab] of hidden states [N, hidden]."""
        return self.lm_head(hidden).float()
