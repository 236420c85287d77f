"""TGIS generation written out plainly, on transformers forward passes: the conformance suite's expected outputs.

One sequence at a time, the whole prefix recomputed every step, every logits
processor a few lines of plain torch, so it shares nothing with the worker's
batched implementation except the torch RNG ops TGIS itself uses for sampling.
Encoder-decoders as TGIS runs them (spec 7.2): the decoder starts from
`decoder_start_token_id` and its ids alone are the penalty's history; input
token details are NaN log-probabilities only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from services.gateway.pb import generation_pb2 as pb
from tests.reference import eos_id, load, one_thread


@dataclass
class Settings:
    """A request's parameters after TGIS's conversion (what validation would produce)."""

    sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    typical_p: float = 0.0
    seed: int = 0
    repetition_penalty: float = 1.0
    length_penalty: tuple[int, float] | None = None
    min_new_tokens: int = 0
    max_new_tokens: int = 20
    truncate_input_tokens: int = 0
    max_sequence_length: int = 200
    top_n: int = 0


@dataclass
class Step:
    token: int
    logprob: float
    rank: int
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class Result:
    input_ids: list[int]
    steps: list[Step]
    stop_reason: int
    token_limited: bool

    @property
    def ids(self) -> list[int]:
        return [s.token for s in self.steps]


def _process(scores: torch.Tensor, history: list[int], generated: int, s: Settings, eos: int, pad: int) -> torch.Tensor:
    scores = scores.clone()
    if generated < s.min_new_tokens:
        scores[eos] = -math.inf
    elif s.length_penalty is not None:
        start, decay = s.length_penalty
        past = generated - start
        if past > 0:
            scores[eos] = scores[eos] + abs(scores[eos]) * (decay**past - 1)
    if s.repetition_penalty != 1.0:
        for token in set(history):
            if token == eos and eos == pad:
                continue  # padding is EOS in TGIS, whose score it restores
            value = scores[token]
            scores[token] = value * s.repetition_penalty if value < 0 else value / s.repetition_penalty
    if not s.sample:
        return scores
    scores = scores / s.temperature
    if s.top_k > 0:
        kth = torch.topk(scores, min(s.top_k, scores.numel())).values[-1]
        scores[scores < kth] = -math.inf
    if s.top_p < 1.0:
        ordered, order = torch.sort(scores)
        cumulative = ordered.softmax(-1).cumsum(-1)
        drop = cumulative <= 1 - s.top_p
        drop[-1] = False
        scores[order[drop]] = -math.inf
    if 0 < s.typical_p < 1.0:
        logp = scores.log_softmax(-1)
        entropy = -(logp * logp.exp()).nansum()
        distance, order = torch.sort((-logp - entropy).abs())
        cumulative = scores[order].softmax(-1).cumsum(-1)
        last = min(int((cumulative < s.typical_p).sum()), scores.numel() - 1)
        drop = distance > distance[last]
        drop[0] = False
        scores[order[drop]] = -math.inf
    return scores


def _top_tokens(scores: torch.Tensor, n: int, with_logprobs: bool) -> list[tuple[int, float]]:
    n = min(n, scores.numel())
    threshold = torch.topk(scores, n).values[-1]
    if threshold == -math.inf:
        threshold = torch.finfo(scores.dtype).min
    ids = torch.nonzero(scores >= threshold).flatten()[: 4 * n].tolist()  # ascending ids
    logp = scores.log_softmax(-1)
    pairs = [(i, float(logp[i])) for i in ids]
    return sorted(pairs, key=lambda p: (-p[1], p[0])) if with_logprobs else pairs


@one_thread()
def generate(model_path: Path, text: str, s: Settings) -> Result:
    """What TGIS generates for one input (token ids, details, stop reason; no stop sequences)."""
    tokenizer, model = load(model_path)
    input_ids = tokenizer(text, add_special_tokens=True).input_ids
    if 0 < s.truncate_input_tokens < len(input_ids):
        input_ids = input_ids[-s.truncate_input_tokens:]
    eos = eos_id(model)
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else eos
    max_new, limited = s.max_new_tokens, False
    if len(input_ids) + max_new > s.max_sequence_length:
        max_new, limited = s.max_sequence_length - len(input_ids), True
    generator = torch.Generator().manual_seed(s.seed) if s.sample else None
    seq2seq = model.config.is_encoder_decoder
    start = model.generation_config.decoder_start_token_id
    ids, steps = [model.config.decoder_start_token_id if start is None else start] if seq2seq else list(input_ids), []
    while True:
        with torch.no_grad():
            if seq2seq:
                out = model(input_ids=torch.tensor([input_ids]), decoder_input_ids=torch.tensor([ids]))
            else:
                out = model(torch.tensor([ids]))
            logits = out.logits[0, -1].float()
        scores = _process(logits, ids, len(steps), s, eos, pad)
        if s.sample:
            probs = scores.softmax(-1)
            token = int((probs / torch.empty_like(probs).exponential_(1, generator=generator)).argmax())
        else:
            token = int(scores.argmax())
        logp = scores.log_softmax(-1)
        rank = int((scores > scores[token]).sum()) + 1
        steps.append(Step(token, float(logp[token]), rank, _top_tokens(scores, s.top_n, True) if s.top_n else []))
        ids.append(token)
        if len(steps) >= s.min_new_tokens and token == eos:
            return Result(input_ids, steps, pb.EOS_TOKEN, limited)
        if len(steps) >= max_new:
            return Result(input_ids, steps, pb.TOKEN_LIMIT if limited else pb.MAX_TOKENS, limited)


@one_thread()
def input_details(model_path: Path, text: str, top_n: int = 0) -> list[Step]:
    """Input-token details: NaN for the first, then from the raw logits of the previous position."""
    tokenizer, model = load(model_path)
    input_ids = tokenizer(text, add_special_tokens=True).input_ids
    if model.config.is_encoder_decoder:
        return [Step(token, math.nan, 0) for token in input_ids]
    with torch.no_grad():
        logits = model(torch.tensor([input_ids])).logits[0].float()
    details = [Step(input_ids[0], math.nan, 0)]
    for i in range(1, len(input_ids)):
        scores = logits[i - 1]
        token = input_ids[i]
        rank = int((scores > scores[token]).sum()) + 1
        details.append(Step(token, float(scores.log_softmax(-1)[token]), rank,
                            _top_tokens(scores, top_n, True) if top_n else []))
    return details
