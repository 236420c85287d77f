"""TGIS parameter conversion and validation, in TGIS order with TGIS's exact messages.

`convert_and_validate` covers checks 1-12 of the TGIS table (everything that
needs no tokenizer); `check_input` covers the per-input length checks after
tokenization (13-15), truncation, the TOKEN_LIMIT lowering and random seeds.
Deliberate additions to TGIS: NaN or infinite float parameters, empty inputs
(no tokens) and replies too large for a gRPC message are refused up front.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field

from services.common.protocol import LogitsParams, StopParams, TokenIds, token_ids
from services.gateway.guided import guide_of
from services.gateway.pb import generation_pb2 as pb

MAX_STOP_SEQS = 6
MAX_STOP_SEQ_LENGTH = 240  # UTF-8 bytes
DEFAULT_MAX_NEW_TOKENS = 20
# Serialized size of one TokenInfo and of each of its top tokens (text, logprob, framing), for the reply estimate.
TOKEN_INFO_BYTES = 32
TOP_TOKEN_BYTES = 24
STOP_SEQ_ERROR = (
    f"can specify at most {MAX_STOP_SEQS} non-empty stop sequences, each not more than {MAX_STOP_SEQ_LENGTH} UTF8 bytes"
)


class ValidationError(ValueError):
    """A request parameter TGIS would reject with INVALID_ARGUMENT; the text is the client-facing message."""


@dataclass(frozen=True)
class Limits:
    """Server limits that validation depends on."""

    max_sequence_length: int
    max_new_tokens: int  # effective: already lowered to max_sequence_length - 1
    default_include_stop_seqs: bool = True
    # Special tokens the tokenizer puts before every text (a BOS): truncation keeps them in front.
    special_prefix: tuple[int, ...] = ()
    vocab_size: int = 0  # top_n_tokens is capped at it; 0 = unknown
    max_reply_bytes: int = 0  # the gRPC send limit a reply's estimated size must fit; 0 = none


@dataclass
class ValidatedParams:
    """One call's parameters, converted to TGIS's internal form and validated."""

    logits: LogitsParams
    max_new_tokens: int
    min_new_tokens: int
    stop_sequences: list[str]
    include_stop_sequence: bool
    deadline: float  # time.time(); 0 = none
    truncate_input_tokens: int
    input_text: bool
    seed: int | None
    response: dict = field(default_factory=dict)
    prefix_id: str = ""  # the call's prompt prefix, once looked up
    adapter_id: str = ""  # the call's LoRA adapter, once checked

    @property
    def sampling(self) -> bool:
        return self.logits.temperature != 0.0


@dataclass
class ValidatedInput:
    """One input after its length checks: the ids to generate from and the per-input stop settings."""

    input_ids: TokenIds
    input_length: int  # after truncation
    stop: StopParams
    seed: int
    prefix_length: int = 0  # virtual tokens of the call's prompt prefix (not in input_length)


def convert_and_validate(params: pb.Parameters | None, limits: Limits, received_at: float | None = None) -> ValidatedParams:
    """TGIS `convert_params` + `validate` checks 1-11 (prefix lookup is the caller's)."""
    received_at = time.time() if received_at is None else received_at
    p = params if params is not None else pb.Parameters()
    has = p.HasField
    response = p.response if has("response") else pb.ResponseOptions()
    decoding = p.decoding if has("decoding") else pb.DecodingParameters()
    stopping = p.stopping if has("stopping") else pb.StoppingCriteria()
    _check_finite(p)

    temperature, top_k, top_p, typical_p, seed = 0.0, 0, 1.0, 0.0, None
    if p.method == pb.SAMPLE:
        if has("sampling"):
            s = p.sampling
            temperature = s.temperature
            # u32 -> i32 as TGIS does, so values >= 2^31 become negative and fail check 4.
            top_k = s.top_k - (1 << 32) if s.top_k >= (1 << 31) else s.top_k
            top_p = s.top_p if s.top_p != 0.0 else 1.0
            typical_p = s.typical_p if s.typical_p != 0.0 else 0.0
            seed = s.seed if s.HasField("seed") else None
        if temperature == 0.0:
            temperature = 1.0  # sampling with temperature 0 means temperature 1
    # Greedy silently ignores every sampling field (TGIS's strict mode is disabled).

    repetition_penalty = decoding.repetition_penalty if decoding.repetition_penalty != 0.0 else 1.0
    length_penalty = decoding.length_penalty if decoding.HasField("length_penalty") else None
    max_new_tokens = stopping.max_new_tokens if stopping.max_new_tokens != 0 else DEFAULT_MAX_NEW_TOKENS
    min_new_tokens = stopping.min_new_tokens
    stop_sequences = list(stopping.stop_sequences)
    include_stop = (
        stopping.include_stop_sequence if stopping.HasField("include_stop_sequence") else limits.default_include_stop_seqs
    )
    deadline = received_at + stopping.time_limit_millis / 1000.0 if stopping.time_limit_millis > 0 else 0.0

    if temperature != 0.0 and temperature < 0.05:
        raise ValidationError("temperature must be >= 0.05")
    if top_p <= 0.0 or top_p > 1.0:
        raise ValidationError("top_p must be > 0.0 and <= 1.0")
    if typical_p > 1.0:
        raise ValidationError("typical_p must be <= 1.0")
    if top_k < 0:
        raise ValidationError("top_k must be strictly positive")
    if max_new_tokens > limits.max_new_tokens:
        raise ValidationError(f"max_new_tokens must be <= {limits.max_new_tokens}")
    if min_new_tokens > max_new_tokens:
        raise ValidationError("min_new_tokens must be <= max_new_tokens")
    if repetition_penalty <= 0.0:
        raise ValidationError("repetition_penalty must be > 0.0")
    if length_penalty is not None and not 1.0 <= length_penalty.decay_factor <= 10.0:
        raise ValidationError("length_penalty must be >= 1.0 and <= 10.0")
    if len(stop_sequences) > MAX_STOP_SEQS:
        raise ValidationError(STOP_SEQ_ERROR)
    wants_detail = response.token_logprobs or response.token_ranks or response.top_n_tokens != 0
    if wants_detail and not (response.input_tokens or response.generated_tokens):
        raise ValidationError("must request input and/or generated tokens to request extra token detail")
    if any(not s or len(s.encode("utf-8")) > MAX_STOP_SEQ_LENGTH for s in stop_sequences):
        raise ValidationError(STOP_SEQ_ERROR)
    # Guided decoding (vLLM TGIS adapter): the constraint itself is checked by the caller (check_guide).
    guide_kind, guide = guide_of(decoding)
    if decoding.WhichOneof("guided") == "choice" and not decoding.choice.choices:
        raise ValidationError("guided decoding choice must list at least one string")

    logits = LogitsParams(
        temperature=temperature, top_k=top_k, top_p=top_p, typical_p=typical_p, seed=0,
        repetition_penalty=repetition_penalty,
        length_penalty_start=length_penalty.start_index if length_penalty is not None else 0,
        length_penalty_decay=length_penalty.decay_factor if length_penalty is not None else 0.0,
        min_new_tokens=min_new_tokens,
        token_logprobs=response.token_logprobs, token_ranks=response.token_ranks,
        # top_n above the documented 5 is accepted, as in TGIS, up to the vocabulary size.
        top_n_tokens=min(response.top_n_tokens, limits.vocab_size) if limits.vocab_size else response.top_n_tokens,
        generated_details=response.generated_tokens, input_details=response.input_tokens,
        guide_kind=guide_kind, guide=guide,
    )
    return ValidatedParams(
        logits=logits, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
        stop_sequences=stop_sequences, include_stop_sequence=include_stop, deadline=deadline,
        truncate_input_tokens=p.truncate_input_tokens, input_text=response.input_text, seed=seed,
    )


def _check_finite(p: pb.Parameters) -> None:
    """Refuse NaN and infinities, which TGIS passes through to nonsense output (empty text, repeated words)."""
    fields = [("sampling.temperature", p.sampling.temperature), ("sampling.top_p", p.sampling.top_p),
              ("sampling.typical_p", p.sampling.typical_p),
              ("decoding.repetition_penalty", p.decoding.repetition_penalty),
              ("decoding.length_penalty.decay_factor", p.decoding.length_penalty.decay_factor)]
    for name, value in fields:
        if not math.isfinite(value):
            raise ValidationError(f"{name} must be a finite number, got {value}")


def estimated_reply_bytes(params: ValidatedParams, input_length: int, max_new_tokens: int) -> int:
    """Upper-bound-ish size of the token details of one unary reply (the largest part of any reply)."""
    logits = params.logits
    per_token = TOKEN_INFO_BYTES + logits.top_n_tokens * TOP_TOKEN_BYTES
    tokens = (input_length if logits.input_details else 0) + (max_new_tokens if logits.generated_details else 0)
    return tokens * per_token


def _truncate(ids: TokenIds, keep: int, special_prefix: tuple[int, ...]) -> TokenIds:
    """Keep the last `keep` tokens; like TGIS's left-truncating HF tokenizer, a leading BOS stays in front."""
    prefix = special_prefix if tuple(ids[: len(special_prefix)]) == special_prefix else ()
    body = max(keep - len(prefix), 0)
    return token_ids([*prefix, *ids[len(ids) - body:]]) if prefix else ids[len(ids) - keep:]


def check_input(ids: TokenIds, params: ValidatedParams, limits: Limits, prefix_length: int = 0) -> ValidatedInput:
    """TGIS checks 14-15 for one tokenized input, then truncation, TOKEN_LIMIT lowering and the seed."""
    input_ids = token_ids(ids)
    input_length = len(input_ids)
    if input_length == 0:
        # A decoder-only model has nothing to continue from: refused rather than started from an implicit BOS.
        raise ValidationError("input text has no tokens; an empty prompt cannot be generated from")
    if 0 < params.truncate_input_tokens < input_length:
        input_length = params.truncate_input_tokens
        input_ids = _truncate(input_ids, input_length, limits.special_prefix)
    total = input_length + prefix_length
    if total >= limits.max_sequence_length:
        raise ValidationError(
            f"input tokens ({input_length}) plus prefix length ({prefix_length}) must be < {limits.max_sequence_length}"
        )
    if total + params.min_new_tokens > limits.max_sequence_length:
        raise ValidationError(
            f"input tokens ({input_length}) plus prefix length ({prefix_length}) plus min_new_tokens "
            f"({params.min_new_tokens}) must be <= {limits.max_sequence_length}"
        )
    max_new_tokens, token_limited = params.max_new_tokens, False
    if total + max_new_tokens > limits.max_sequence_length:
        max_new_tokens, token_limited = limits.max_sequence_length - total, True
    reply_bytes = estimated_reply_bytes(params, input_length, max_new_tokens)
    if limits.max_reply_bytes and reply_bytes > limits.max_reply_bytes:
        raise ValidationError(
            f"token details of {input_length} input and up to {max_new_tokens} generated tokens with "
            f"top_n_tokens={params.logits.top_n_tokens} would make a reply of about {reply_bytes // 2**20} MiB, over the "
            f"{limits.max_reply_bytes // 2**20} MiB message limit: ask for fewer top tokens or fewer tokens")
    if not params.sampling:
        seed = 0
    elif params.seed is not None:
        seed = params.seed
    else:
        seed = random.getrandbits(32)  # per input, so identical inputs in one batch differ
    return ValidatedInput(
        input_ids=input_ids, input_length=input_length,
        stop=StopParams(max_new_tokens, params.min_new_tokens, params.deadline, token_limited),
        seed=seed, prefix_length=prefix_length,
    )


def with_prefix_placeholders(validated: ValidatedInput, pad_token_id: int) -> TokenIds:
    """The ids the model runs: one pad id per prompt prefix position (the prefix's embeddings replace them on the
    workers; input token details show them as pad tokens, as TGIS does), then the input."""
    if not validated.prefix_length:
        return validated.input_ids
    return token_ids([pad_token_id] * validated.prefix_length + list(validated.input_ids))
