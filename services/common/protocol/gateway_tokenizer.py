"""Gateway <-> tokenizer messages: pool hello/goodbye, tokenize jobs, and the detokenizer open/tokens/result/close stream."""

from __future__ import annotations

from typing import ClassVar

from msgspec import field

from services.common.protocol.base import (
    PROTOCOL_VERSION,
    MessageKind,
    StopReason,
    TokenIds,
    Wire,
    token_ids,
)

# --------------------------------------------------------------------------- gateway <-> tokenizers


class TokenizerHello(Wire):
    """Tokenizer -> gateway: a process joined the pool (also sent again after a gateway restart)."""

    KIND: ClassVar[MessageKind] = MessageKind.TOKENIZER_HELLO
    name: str
    pid: int
    version: int = PROTOCOL_VERSION


class TokenizerGoodbye(Wire):
    """Tokenizer -> gateway: leaving the pool; its open work must move elsewhere."""

    KIND: ClassVar[MessageKind] = MessageKind.TOKENIZER_GOODBYE
    name: str


class TokenizedText(Wire):
    """One text's tokenization."""

    ids: TokenIds
    tokens: list[str] = field(default_factory=list)
    offsets: list[tuple[int, int]] = field(default_factory=list)


class Tokenize(Wire):
    """Gateway -> tokenizer: encode texts with special tokens added."""

    KIND: ClassVar[MessageKind] = MessageKind.TOKENIZE
    job_id: int
    texts: list[str]
    return_tokens: bool = False
    return_offsets: bool = False


class TokenizeResult(Wire):
    """Tokenizer -> gateway: the answer to `Tokenize` (or the tokenizer's error)."""

    KIND: ClassVar[MessageKind] = MessageKind.TOKENIZE_RESULT
    job_id: int
    results: list[TokenizedText]
    error: str = ""


class DetokParams(Wire):
    """How to turn one request's generated ids into text."""

    stop_sequences: list[str]
    include_stop_sequence: bool
    skip_special_tokens: bool
    eos_token_id: int
    min_new_tokens: int = 0
    stream: bool = False  # hold back text that a stop sequence might still take back


class DetokOpen(Wire):
    """Gateway -> tokenizer: start (or, after a tokenizer loss, resume) a request's detokenizer.

    `replay_ids` are tokens already turned into text elsewhere: decode them
    silently so the next `DetokItem` continues where the lost process stopped.
    """

    KIND: ClassVar[MessageKind] = MessageKind.DETOK_OPEN
    request_id: str
    params: DetokParams
    replay_ids: TokenIds = field(default_factory=token_ids)


class DetokItem(Wire):
    """New ids of one request.  `piece_ids` are ids whose raw vocabulary pieces are wanted."""

    request_id: str
    first_index: int  # generated-token index of ids[0]
    ids: TokenIds
    stop_reason: StopReason = StopReason.NOT_FINISHED
    piece_ids: TokenIds = field(default_factory=token_ids)


class DetokTokens(Wire):
    """Gateway -> tokenizer: new ids for requests that tokenizer owns."""

    KIND: ClassVar[MessageKind] = MessageKind.DETOK_TOKENS
    items: list[DetokItem]


class DetokDelta(Wire):
    """Text released by one DetokItem, one entry per id.

    `texts[i]` is the text that became final with ids[i].  When a stop
    sequence matched, `stop_reason` is STOP_SEQUENCE and `texts` ends at the
    token that completed it; later ids of that request are ignored.
    """

    request_id: str
    first_index: int
    texts: list[str]
    stop_reason: StopReason = StopReason.NOT_FINISHED
    stop_sequence: str = ""
    pieces: list[str] = field(default_factory=list)
    error: str = ""  # set (with stop_reason ERROR) when this request's ids could not be decoded


class DetokResult(Wire):
    """Tokenizer -> gateway: answers to one DetokTokens."""

    KIND: ClassVar[MessageKind] = MessageKind.DETOK_RESULT
    deltas: list[DetokDelta]


class DetokClose(Wire):
    """Gateway -> tokenizer: forget these requests."""

    KIND: ClassVar[MessageKind] = MessageKind.DETOK_CLOSE
    request_ids: list[str]
