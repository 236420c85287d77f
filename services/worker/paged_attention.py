"""Attention over a paged KV cache: where a forward pass's tokens write K/V, and what each query attends to.

The cache of one layer is a pool of fixed-size blocks, `[num_blocks,
block_size, kv_heads, head_dim]`; a sequence owns the blocks its block table
lists, position p living in block `table[p // block_size]` at offset
`p % block_size`.  A forward pass packs all of a step's tokens along one
axis: first one token per decoding sequence, then the prefill chunks.  Per
layer, every token's K/V is written into its slot first, then queries attend:
decode tokens in one call of the native CPU kernel, which reads their blocks
in place (`cpu_attention.py`), or else in batched SDPA calls over their
gathered blocks (one call per group of similar table lengths, padded to the
group's longest table and masked by length); each prefill chunk on its own,
over its own K/V when it starts the sequence (plain causal attention), else
over its gathered blocks with a causal mask shifted by the chunk's start.

Models reach it through `attend(q, k, v, layer)`: the step's `PagedBatch`
and the cache come from `forward_context`, set by the engine around the
forward pass (as vLLM does), so a model's forward takes only tensors and
`torch.compile` sees attention as one opaque op (`tgis::paged_attention`)
while everything around it is traced.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Optional

import torch
import torch.nn.functional as F

from services.worker import cpu_attention

if TYPE_CHECKING:
    from services.worker.kv_cache import PagedKVCache

MIN_GROUP_BLOCKS = 8  # decodes whose tables are all shorter than this share one group, whatever their lengths


@dataclass
class PrefillChunk:
    """`count` packed tokens from row `row`, at positions start .. start + count - 1 of a sequence."""

    row: int
    count: int
    start: int
    blocks: torch.Tensor  # [n] the sequence's blocks covering positions 0 .. start + count - 1


@dataclass
class DecodeGroup:
    """Decoding sequences attended in one call, their block tables padded to the group's longest."""

    rows: torch.Tensor | None  # [g] their packed rows (None: rows 0 .. g - 1, every decode of the pass)
    blocks: torch.Tensor  # [g, max_blocks] block tables (padded with each row's first block)
    mask: torch.Tensor  # [g, 1, 1, max_blocks * block_size], True where a key exists
    _bias: torch.Tensor | None = field(default=None, init=False, repr=False)

    def bias(self, dtype: torch.dtype) -> torch.Tensor:
        """`mask` as an additive mask (0 / -inf) in `dtype`, made once per pass: SDPA is about twice as fast
        on CPU with a float mask than with a boolean one, which it would convert in every layer."""
        if self._bias is None or self._bias.dtype != dtype:
            zeros = torch.zeros(self.mask.shape, dtype=dtype, device=self.mask.device)
            self._bias = zeros.masked_fill_(~self.mask, float("-inf"))
        return self._bias

    @classmethod
    def build(cls, rows: list[int] | None, tables: list[list[int]], lengths: list[int], block_size: int,
              device: torch.device) -> DecodeGroup:
        blocks = _padded_tables(tables, device)
        keys = torch.arange(blocks.shape[1] * block_size, device=device)
        mask = (keys[None] < torch.tensor(lengths, device=device)[:, None])[:, None, None]
        return cls(None if rows is None else torch.tensor(rows, device=device), blocks, mask)


def _padded_tables(tables: list[list[int]], device: torch.device) -> torch.Tensor:
    """Block tables as one int64 tensor [n, longest], each padded with its own first block (a real block, so
    reading it is safe; the masks or lengths keep it out of the attention)."""
    width = max(len(t) for t in tables)
    return torch.tensor([t + [t[0]] * (width - len(t)) for t in tables], dtype=torch.int64, device=device)


def _decode_groups(tables: list[list[int]], lengths: list[int], block_size: int,
                   device: torch.device) -> list[DecodeGroup]:
    """The pass's decodes in groups of similar table lengths (within 2x, or all under MIN_GROUP_BLOCKS blocks).

    Why not one group: padding every table to the longest makes each decode read the longest
    sequence's worth of (masked) keys; 16 short streams beside one 2,000-token sequence took
    240-640 ms a float32 step instead of ~75.
    """
    groups: dict[int, list[int]] = {}
    for row, table in enumerate(tables):
        groups.setdefault(max(len(table), MIN_GROUP_BLOCKS).bit_length(), []).append(row)
    if len(groups) == 1:
        return [DecodeGroup.build(None, tables, lengths, block_size, device)]
    return [DecodeGroup.build(rows, [tables[r] for r in rows], [lengths[r] for r in rows], block_size, device)
            for rows in groups.values()]


@dataclass
class PagedBatch:
    """What every layer of one forward pass shares about where tokens go and what they attend to."""

    slots: torch.Tensor  # [T] flat cache slot (block * block_size + offset) of each packed token
    num_decode: int  # the first num_decode packed tokens are one decoding token per sequence
    chunks: list[PrefillChunk]
    block_size: int
    device: torch.device
    decode_tables: list[list[int]]  # each decode's blocks covering its keys
    decode_lengths: list[int]  # each decode's keys (its position + 1)

    @classmethod
    def build(cls, block_size: int, tables: list[list[int]], starts: list[int], counts: list[int],
              device: torch.device) -> PagedBatch:
        """Sequences in packing order: decodes (count 1, listed first) then prefill chunks."""
        slots, decode_tables, decode_lengths, chunks, row = [], [], [], [], 0
        for table, start, count in zip(tables, starts, counts, strict=True):
            positions = range(start, start + count)
            slots.extend(table[p // block_size] * block_size + p % block_size for p in positions)
            blocks = table[: (start + count + block_size - 1) // block_size]
            if count == 1 and start > 0 and not chunks:
                decode_tables.append(blocks)
                decode_lengths.append(start + 1)
            else:
                chunks.append(PrefillChunk(row, count, start, torch.tensor(blocks, device=device)))
            row += count
        return cls(torch.tensor(slots, device=device), len(decode_tables), chunks, block_size, device,
                   decode_tables, decode_lengths)

    @cached_property
    def decode_groups(self) -> list[DecodeGroup]:
        """The decodes in groups for the torch path (built on first use: the native kernel needs none)."""
        if not self.decode_tables:
            return []
        return _decode_groups(self.decode_tables, self.decode_lengths, self.block_size, self.device)

    @cached_property
    def decode_table_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every decode's block table, padded to the longest, [num_decode, width], and key counts [num_decode]
        (int64), for the native kernel."""
        return (_padded_tables(self.decode_tables, self.device),
                torch.tensor(self.decode_lengths, dtype=torch.int64, device=self.device))


def _gather(cache: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """[..., n] block ids -> [..., kv_heads, n * block_size, head_dim] keys or values."""
    # index_select, not cache[blocks]: advanced indexing on CPU costs milliseconds per call here.
    gathered = cache.index_select(0, blocks.flatten()).view(*blocks.shape, *cache.shape[1:])
    return gathered.flatten(-4, -3).transpose(-3, -2)


def _position_mask(slopes: torch.Tensor | None, table: torch.Tensor | None, query_pos: torch.Tensor,
                   key_pos: torch.Tensor, allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask [..., heads, Q, K] from query positions [..., Q] and key positions [K] where `allowed`
    (broadcast to it), else -inf: ALiBi's slope * (key - query), or a bias `table` [heads, D] looked up by the
    distance query - key (clamped to D - 1)."""
    relative = key_pos[..., None, :] - query_pos[..., :, None]  # [..., Q, K]
    if slopes is not None:
        bias = slopes[:, None, None] * relative[..., None, :, :]
    else:
        bias = table.T[(-relative).clamp(0, table.shape[1] - 1)].movedim(-1, -3)
    return bias.masked_fill(~allowed, float("-inf")).to(dtype)


def _decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, group: DecodeGroup,
            alibi_slopes: torch.Tensor | None, position_bias: torch.Tensor | None,
            sliding_window: int | None) -> torch.Tensor:
    """Attention output [g, heads, d] of one decode group's queries (rows of q) over their gathered blocks."""
    g = group.blocks.shape[0]
    keys, values = _gather(k_cache, group.blocks), _gather(v_cache, group.blocks)
    if alibi_slopes is None and position_bias is None and not sliding_window:
        mask = group.bias(q.dtype)
    else:  # each decode's query sits at its last key
        mask = group.mask
        key_pos = torch.arange(mask.shape[-1], device=q.device)
        last = mask.sum(-1, keepdim=True) - 1  # [g, 1, 1, 1] query positions
        if sliding_window:
            mask = mask & (key_pos > last - sliding_window)
        if alibi_slopes is not None or position_bias is not None:
            mask = _position_mask(alibi_slopes, position_bias, last[:, 0, 0], key_pos, mask, q.dtype)
    # A KV head's query heads as its queries ([g, kv_heads, group, d]): one SDPA tile per KV head instead of
    # enable_gqa's one per query head (demo model, 32 decodes: 0.41 instead of 0.46 ms a layer on CPU, and
    # 41 instead of 48 us for one). Per-head masks (ALiBi, T5) group the same way.
    kv_heads = k_cache.shape[2]
    queries = q[:g] if group.rows is None else q.index_select(0, group.rows)
    queries = queries.reshape(g, kv_heads, -1, q.shape[-1])
    if mask.shape[1] > 1:
        mask = mask.view(g, kv_heads, -1, mask.shape[-1])
    return F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask).view(g, -1, q.shape[-1])


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, batch: PagedBatch, alibi_slopes: torch.Tensor | None = None,
                    position_bias: torch.Tensor | None = None, sliding_window: int | None = None) -> torch.Tensor:
    """q [T, heads, d], k/v [T, kv_heads, d] of the packed tokens -> attention output [T, heads, d].

    Writes k/v into the caches at `batch.slots` first, so chunks and decodes
    of the same pass see each other's keys where their tables share blocks.
    With `alibi_slopes` [heads] (float32), scores get slope * (key position -
    query position) added (BLOOM, MPT); with `position_bias` [heads, D]
    (float32), its entry for the distance query - key (T5's decoder).  With `sliding_window` W, a query at
    position p sees keys at p - W + 1 .. p only (Mistral; transformers' `kv_idx > q_idx - sliding_window`).
    """
    positional = alibi_slopes is not None or position_bias is not None
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, batch.slots, k)
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, batch.slots, v)
    # Contiguous, as the fake op below promises the compiler; decodes fill its first rows, chunks the rest.
    out = q.new_empty(q.shape)
    if batch.num_decode and cpu_attention.applies(q, k_cache, v_cache, positional):
        tables, lengths = batch.decode_table_tensors
        cpu_attention.decode(q, k_cache, v_cache, tables, lengths, out, sliding_window)
    elif batch.num_decode:
        groups = batch.decode_groups
        if len(groups) == 1:
            decoded = _decode(q, k_cache, v_cache, groups[0], alibi_slopes, position_bias, sliding_window)
            if not batch.chunks:  # a decode-only step (the common case): no output to assemble
                return decoded
            out[:batch.num_decode] = decoded
        else:
            for group in groups:
                out.index_copy_(0, group.rows, _decode(q, k_cache, v_cache, group, alibi_slopes, position_bias,
                                                       sliding_window))
    for chunk in batch.chunks:
        rows = slice(chunk.row, chunk.row + chunk.count)
        query = q[rows].transpose(0, 1)[None]
        if chunk.start == 0 and not positional and not (sliding_window and chunk.count > sliding_window):
            keys, values = k[rows].transpose(0, 1)[None], v[rows].transpose(0, 1)[None]
            result = F.scaled_dot_product_attention(query, keys, values, is_causal=True, enable_gqa=True)
        else:
            end = chunk.start + chunk.count
            keys = _gather(k_cache, chunk.blocks)[None, :, :end]
            values = _gather(v_cache, chunk.blocks)[None, :, :end]
            positions = torch.arange(chunk.start, end, device=q.device)
            key_pos = torch.arange(end, device=q.device)
            mask = key_pos[None] <= positions[:, None]
            if sliding_window:
                mask &= key_pos[None] > positions[:, None] - sliding_window
            if positional:
                mask = _position_mask(alibi_slopes, position_bias, positions, key_pos, mask, q.dtype)
            result = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, enable_gqa=True)
        out[rows] = result[0].transpose(0, 1)
    return out


_context: tuple[PagedBatch, PagedKVCache] | None = None


@contextmanager
def forward_context(batch: PagedBatch, cache: PagedKVCache) -> Iterator[None]:
    """Make `batch` and `cache` the ones `attend` uses during one forward pass."""
    global _context
    previous, _context = _context, (batch, cache)
    try:
        yield
    finally:
        _context = previous


def _attend_in_context(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int,
                       alibi_slopes: torch.Tensor | None = None, position_bias: torch.Tensor | None = None,
                       sliding_window: int | None = None) -> torch.Tensor:
    if _context is None:
        raise RuntimeError("attend() called outside forward_context()")
    batch, cache = _context
    return paged_attention(q, k, v, cache.k[layer], cache.v[layer], batch, alibi_slopes, position_bias,
                           sliding_window)


@torch.library.custom_op("tgis::paged_attention", mutates_args=())
def _attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int,
                  alibi_slopes: Optional[torch.Tensor] = None,  # noqa: UP045 (schema inference)
                  position_bias: Optional[torch.Tensor] = None,  # noqa: UP045
                  sliding_window: Optional[int] = None) -> torch.Tensor:  # noqa: UP045
    # Writes the cache of the forward context as a side effect: the cache is no input of a compiled graph, and
    # each layer's call depends on the previous layer's output, so the compiler can neither drop nor reorder it.
    return _attend_in_context(q, k, v, layer, alibi_slopes, position_bias, sliding_window)


@_attention_op.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int,
      alibi_slopes: Optional[torch.Tensor] = None,  # noqa: UP045
      position_bias: Optional[torch.Tensor] = None,  # noqa: UP045
      sliding_window: Optional[int] = None) -> torch.Tensor:  # noqa: UP045
    return q.new_empty(q.shape)  # contiguous, like the real op's output


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int,
           alibi_slopes: torch.Tensor | None = None, position_bias: torch.Tensor | None = None,
           sliding_window: int | None = None) -> torch.Tensor:
    """Paged attention of `layer` for the current forward context's batch: q [T, heads, d], k/v [T, kv_heads, d];
    `alibi_slopes` [heads] adds ALiBi position biases, `position_bias` [heads, D] a bias by distance (T5),
    `sliding_window` limits each query to that many latest keys (Mistral)."""
    if torch.compiler.is_compiling():
        return _attention_op(q, k, v, layer, alibi_slopes, position_bias, sliding_window)
    return _attend_in_context(q, k, v, layer, alibi_slopes, position_bias, sliding_window)  # eager: no dispatcher
