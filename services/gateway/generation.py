"""One input's generation as the gateway sees it: scheduler tokens + tokenizer text -> response events.

Token ids and their details come from the scheduler (`TokenOutput`); their
text comes later from the request's tokenizer (`DetokDelta`).  A `Generation`
pairs the two by token index and queues `TokenEvent`s for the RPC handler, in
order, ending with exactly one final event (or a failure).
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from dataclasses import dataclass, field

from services.common.protocol import DetokDelta, DetokItem, StopReason, TokenDetail, TokenOutput, token_ids
from services.gateway.pb import generation_pb2 as pb
from services.gateway.validation import ValidatedInput, ValidatedParams


@dataclass
class TokenEvent:
    """Text (and token info) released by one generated token; `stop_reason` set on the last one."""

    count: int
    text: str
    token: pb.TokenInfo | None = None
    stop_reason: StopReason = StopReason.NOT_FINISHED
    stop_sequence: str = ""


@dataclass
class InputTokensEvent:
    tokens: list[pb.TokenInfo]


@dataclass
class FailedEvent:
    message: str


def _token_info(detail: TokenDetail, pieces: list[str], params: ValidatedParams, first_input: bool = False) -> pb.TokenInfo:
    """TGIS TokenInfo from a detail and its pieces ([token piece, *top pieces])."""
    info = pb.TokenInfo(text=pieces[0])
    logits = params.logits
    if logits.token_logprobs:
        info.logprob = math.nan if first_input else detail.logprob
    if logits.token_ranks and not first_input:
        info.rank = detail.rank
    for i, _ in enumerate(detail.top_ids):
        top = info.top_tokens.add(text=pieces[1 + i])
        if logits.token_logprobs:
            top.logprob = detail.top_logprobs[i]
    return info


def _piece_ids(details: list[TokenDetail]) -> list[int]:
    ids: list[int] = []
    for detail in details:
        ids.append(detail.token_id)
        ids.extend(detail.top_ids)
    return ids


@dataclass
class Generation:
    """Tracks one input from submission to its final event."""

    request_id: str
    params: ValidatedParams
    input: ValidatedInput
    correlation_id: str = ""  # the caller's x-correlation-id, for logs
    received_at: float = field(default_factory=time.monotonic)
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    details: dict[int, TokenDetail] = field(default_factory=dict)
    input_details: list[TokenDetail] | None = None
    scheduler_stop: tuple[int, StopReason] | None = None
    delivered: int = 0  # tokens whose event was queued
    finished: bool = False
    queue_duration: float = 0.0
    first_token_at: float | None = None
    last_token_at: float | None = None
    inter_token: list[float] = field(default_factory=list)

    @property
    def wants_details(self) -> bool:
        return self.params.logits.generated_details

    def on_tokens(self, output: TokenOutput) -> DetokItem | None:
        """Record the scheduler's tokens; return what the tokenizer must turn into text."""
        if self.finished:
            return None
        now = time.monotonic()
        if output.tokens:
            if self.first_token_at is None:
                self.first_token_at = now
                self.queue_duration = output.queue_duration
            elif self.last_token_at is not None:
                self.inter_token.append(now - self.last_token_at)
            self.last_token_at = now
        first_index = output.generated_count - len(output.tokens)
        for i, detail in enumerate(output.tokens):
            self.details[first_index + i] = detail
        if output.stop_reason != StopReason.NOT_FINISHED:
            self.scheduler_stop = (output.generated_count, StopReason(output.stop_reason))
        piece_details: list[TokenDetail] = []
        if output.input_details is not None and self.params.logits.input_details:
            self.input_details = output.input_details
            piece_details.extend(output.input_details)
        if self.wants_details:
            piece_details.extend(output.tokens)
        return DetokItem(
            self.request_id, first_index, token_ids(d.token_id for d in output.tokens),
            StopReason(output.stop_reason), token_ids(_piece_ids(piece_details)),
        )

    def on_delta(self, delta: DetokDelta) -> None:
        """Turn the tokenizer's text for some tokens into events."""
        if self.finished:
            return
        if delta.error:
            self.fail(f"detokenization failed: {delta.error}")
            return
        input_details = self.input_details if delta.first_index == 0 and self.params.logits.input_details else None
        wanted = sum(1 + len(d.top_ids) for d in input_details or ())
        if self.wants_details:
            wanted += sum(1 + len(d.top_ids) for i in range(len(delta.texts))
                          if (d := self.details.get(delta.first_index + i)) is not None)
        if len(delta.pieces) < wanted:
            self.fail(f"detokenization failed: {len(delta.pieces)} token pieces for {wanted}")
            return
        pieces = iter(delta.pieces)  # consumed in order: the input details' pieces, then each token's
        if input_details is not None:
            infos = []
            for i, detail in enumerate(input_details):
                infos.append(_token_info(detail, list(itertools.islice(pieces, 1 + len(detail.top_ids))), self.params,
                                         first_input=i == 0))
            self.events.put_nowait(InputTokensEvent(infos))
        for i, text in enumerate(delta.texts):
            index = delta.first_index + i
            detail = self.details.pop(index, None)
            token = None
            if self.wants_details and detail is not None:
                token = _token_info(detail, list(itertools.islice(pieces, 1 + len(detail.top_ids))), self.params)
            count = index + 1
            event = TokenEvent(count, text, token)
            if delta.stop_reason == StopReason.STOP_SEQUENCE and i == len(delta.texts) - 1:
                event.stop_reason, event.stop_sequence = StopReason.STOP_SEQUENCE, delta.stop_sequence
            elif self.scheduler_stop is not None and count == self.scheduler_stop[0]:
                event.stop_reason = self.scheduler_stop[1]
            self._emit(event)

    def finish_without_tokens(self, reason: StopReason) -> None:
        """End with no generated token (deadline passed in the queue)."""
        self._emit(TokenEvent(0, "", None, reason))

    def fail(self, message: str) -> None:
        if not self.finished:
            self.finished = True
            self.events.put_nowait(FailedEvent(message))

    def _emit(self, event: TokenEvent) -> None:
        self.delivered = max(self.delivered, event.count)
        if event.stop_reason != StopReason.NOT_FINISHED:
            self.finished = True
        self.events.put_nowait(event)
