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

Prompt prefixes (TGIS's encoder-decoder form): the prompt starts with
`prefix_length` placeholders (encoder rows + decoder rows + 1); the encoder
input is the prefix's encoder rows then the embeddings of the encoder ids,
and the decoder's first positions are the prefix's decoder rows, then the
start token, so the decoder starts D positions earlier (`_Layout`).

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
    from services.worker.engine import Engine
    from services.worker.sequence import Planned


def run_encoder_decoder(engine: Engine, planned: list[Planned]) -> list[SequenceOutput]:
    """One step of an encoder-decoder model: decoder rows of every chunk in one pass, then sampling."""
    model, device = engine.model, engine.device
    ids, positions, tables, starts, counts, segments, sampling, nan_details = [], [], [], [], [], [], [], set()
    prefix_rows: list[tuple[int, torch.Tensor]] = []  # (packed row, embedding) of decoder prompt prefix rows
    # Decodes first, so they attend in one batched call (decoder position >= 1: scheduler position >= n).
    planned.sort(key=lambda p: not (p.chunk.count == 1 and p.chunk.start >= p.sequence.prompt_length))
    for p in planned:
        seq, chunk = p.sequence, p.chunk
        layout = _Layout(seq, model.args.decoder_start_token_id)
        end = chunk.start + chunk.count
        seq.computed = end
        first = max(chunk.start, layout.decoder_start)
        if first >= end:  # encoder input only: nothing to run until the decoder's first position
            continue
        if seq.cross is None:
            seq.cross = model.encode(layout.encoder_embeddings(model, device))
        j0, count = first - layout.decoder_start, end - first
        segments.append((len(ids), count, seq.cross))
        for j in range(j0, j0 + count):
            if j < layout.decoder_prefix:
                prefix_rows.append((len(ids), seq.prefix.decoder[j]))
            ids.append(layout.decoder_token(j))
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
    x = model.embed(torch.tensor(ids, device=device))
    for row, embedding in prefix_rows:
        x[row] = embedding
    batch = PagedBatch.build(engine.cache.block_size, tables, starts, counts, device)
    with forward_context(batch, engine.cache):
        hidden = model.decode(x, torch.tensor(positions, device=device), segments)
    if not sampling:
        return []
    logits = model.logits(hidden.index_select(0, torch.tensor([row for _, row in sampling], device=device)))
    outputs = engine._sample([(p, i, i) for i, (p, _) in enumerate(sampling)], logits)
    for output, (p, _) in zip(outputs, sampling, strict=True):
        if p.sequence.request_id in nan_details:
            logprob = math.nan if p.sequence.params.token_logprobs else 0.0
            output.input_details = [TokenDetail(token_id=t, logprob=logprob)
                                    for t in p.sequence.tokens[: p.sequence.prompt_length]]
    return outputs


class _Layout:
    """Where a sequence's parts sit among its scheduler positions.

    The prompt is `prefix_length` placeholders then the encoder ids (n' tokens
    in all); the decoder's positions are its prompt prefix rows (D), the start
    token, then the generated tokens, the start token at the prompt's last
    position, so decoder position j is scheduler position decoder_start + j.
    """

    def __init__(self, seq, start_token: int) -> None:
        self.seq, self.start_token = seq, start_token
        prefix = seq.prefix
        self.decoder_prefix = 0 if prefix is None or prefix.decoder is None else prefix.decoder.shape[0]
        self.placeholders = 0 if prefix is None else prefix.length
        self.decoder_start = seq.prompt_length - 1 - self.decoder_prefix

    def encoder_embeddings(self, model, device: torch.device) -> torch.Tensor:
        """The encoder input: the prompt prefix's encoder rows, then the embeddings of the encoder ids."""
        ids = torch.tensor(self.seq.tokens[self.placeholders: self.seq.prompt_length], device=device)
        x = model.embed(ids)
        prefix = self.seq.prefix
        return x if prefix is None or prefix.encoder is None else torch.cat([prefix.encoder, x])

    def decoder_token(self, j: int) -> int:
        """The token id of decoder position j (a placeholder for prefix rows, whose embeddings replace it)."""
        if j <= self.decoder_prefix:
            return self.start_token
        return self.seq.tokens[self.seq.prompt_length - 1 + j - self.decoder_prefix]
