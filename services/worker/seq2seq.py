"""Encoder-decoder steps in the paged engine: the scheduler's positions mapped onto encoder input and decoder tokens.

The scheduler sees an encoder-decoder sequence like any other: its tokens are
the encoder input (n ids) followed by what it generated, and it schedules them
as prompt chunks then decodes, with KV blocks for every position.  Here,
scheduler position p >= n - 1 is decoder position j = p - (n - 1): j = 0 is
`decoder_start_token_id` (what the last prompt position samples from), j >= 1
the generated tokens.  Chunks over the encoder input alone compute nothing:
the encoder runs on the whole input when the first decoder row of the
sequence runs, and its cross-attention keys/values stay with the sequence on
the worker (`Sequence.cross`) until it ends.  Decoder position j keeps its
self-attention K/V in the slot of scheduler position j, which the sequence's
blocks always cover (j <= p); the scheduler turns prefix caching off for
these models, so those blocks are never shared.  Preempted sequences come
back as chunks from 0 and recompute their decoder rows the same way.

TGIS's seq2seq rules kept here: input token details are the encoder ids with
NaN log-probabilities only (no ranks or alternatives), and the repetition
penalty sees decoder ids only (`engine._add`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from services.common.protocol import SequenceOutput, TokenDetail
from services.worker.paged_attention import PagedBatch, forward_context

if TYPE_CHECKING:
    from services.worker.engine import Engine, Planned


def run_encoder_decoder(engine: Engine, planned: list[Planned]) -> list[SequenceOutput]:
    """One step of an encoder-decoder model: decoder rows of every chunk in one pass, then sampling."""
    model, start_id = engine.model, engine.model.args.decoder_start_token_id
    ids, positions, tables, starts, counts, segments, sampling, nan_details = [], [], [], [], [], [], [], set()
    # Decodes first, so they attend in one batched call (decoder position >= 1: scheduler position >= n).
    planned.sort(key=lambda p: not (p.chunk.count == 1 and p.chunk.start >= p.sequence.prompt_length))
    for p in planned:
        seq, chunk = p.sequence, p.chunk
        n, end = seq.prompt_length, chunk.start + chunk.count
        seq.computed = end
        first = max(chunk.start, n - 1)
        if first >= end:  # encoder input only: nothing to run until its last position
            continue
        if seq.cross is None:
            seq.cross = model.encode(torch.tensor(seq.tokens[:n], device=engine.device))
        j0, count = first - (n - 1), end - first
        segments.append((len(ids), count, seq.cross))
        ids.extend(start_id if j == 0 else seq.tokens[n - 1 + j] for j in range(j0, j0 + count))
        positions.extend(range(j0, j0 + count))
        tables.append(list(chunk.block_table))
        starts.append(j0)
        counts.append(count)
        if p.samples:
            if p.wants_input_details:  # TGIS: encoder ids with NaN logprobs only, not computed from logits
                nan_details.add(seq.request_id)
                seq.details_sent = True
            sampling.append((p, len(ids) - 1))
    if not ids:
        return []
    batch = PagedBatch.build(engine.cache.block_size, tables, starts, counts, engine.device)
    with forward_context(batch, engine.cache):
        hidden = model.decode(torch.tensor(ids, device=engine.device), torch.tensor(positions, device=engine.device),
                              segments)
    if not sampling:
        return []
    rows = torch.tensor([row for _, row in sampling], device=engine.device)
    logits = model.logits(hidden.index_select(0, rows))
    outputs = engine._sample([(p, i, i) for i, (p, _) in enumerate(sampling)], logits)
    for output, (p, _) in zip(outputs, sampling, strict=True):
        if p.sequence.request_id in nan_details:
            logprob = math.nan if p.sequence.params.token_logprobs else 0.0
            output.input_details = [TokenDetail(token_id=t, logprob=logprob)
                                    for t in p.sequence.tokens[: p.sequence.prompt_length]]
    return outputs
