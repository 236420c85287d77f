"""Queue and continuous batching: who joins the running batch, when sequences stop (no sockets).

The policy follows TGIS's router: a new request joins the running batch
between decode steps; waiting requests are added once enough of them wait or
the batch has waited `max_waiting_tokens` steps; a finished sequence leaves at
once.  Stop conditions are checked here in TGIS order (time limit,
min_new_tokens, EOS, max tokens); stop sequences are the tokenizer's job.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from services.common.protocol import (
    GenerateRequest,
    NewSequence,
    SequenceOutput,
    Step,
    StepStats,
    StopReason,
    TokenOutput,
)


@dataclass
class Sequence:
    """A request's scheduling state."""

    request: GenerateRequest
    gateway: bytes
    queued_at: float = field(default_factory=time.monotonic)
    started_at: float = 0.0
    generated: int = 0

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def remaining(self) -> int:
        return self.request.stop.max_new_tokens - self.generated


@dataclass
class Finished:
    """A sequence that ended outside a step (cancelled or timed out while queued)."""

    sequence: Sequence
    output: TokenOutput | None


class Batcher:
    """Holds the waiting queue and the running batch, and turns them into worker Steps."""

    def __init__(self, max_batch_size: int, max_waiting_tokens: int, eos_token_id: int) -> None:
        self.max_batch_size = max_batch_size
        self.max_waiting_tokens = max_waiting_tokens
        self.eos_token_id = eos_token_id
        self.waiting: deque[Sequence] = deque()
        self.running: dict[str, Sequence] = {}
        self.to_remove: list[str] = []
        self.num_waiting_tokens = 0
        self.next_prefill_after: float | None = None
        self.num_steps = 0
        self._in_step: list[Sequence] = []
        self._added: set[str] = set()

    # ------------------------------------------------------------------ input

    def submit(self, gateway: bytes, requests: list[GenerateRequest]) -> None:
        for request in requests:
            self.waiting.append(Sequence(request, gateway))

    def cancel(self, request_ids: list[str]) -> None:
        """Drop requests wherever they are; nobody waits for an answer."""
        ids = set(request_ids)
        self.waiting = deque(s for s in self.waiting if s.request_id not in ids)
        for request_id in ids & self.running.keys():
            del self.running[request_id]
            self.to_remove.append(request_id)

    def drop_gateway(self, gateway: bytes) -> None:
        """A gateway vanished: its requests have no one to answer to."""
        self.cancel([s.request_id for s in [*self.waiting, *self.running.values()] if s.gateway == gateway])

    def expire_waiting(self, now: float | None = None) -> list[Finished]:
        """Requests whose deadline passed in the queue end with TIME_LIMIT and no tokens."""
        now = time.time() if now is None else now
        expired = [s for s in self.waiting if s.request.stop.deadline and now > s.request.stop.deadline]
        if not expired:
            return []
        self.waiting = deque(s for s in self.waiting if s not in expired)
        return [
            Finished(s, TokenOutput(s.request_id, [], 0, StopReason.TIME_LIMIT,
                                    queue_duration=time.monotonic() - s.queued_at))
            for s in expired
        ]

    # ------------------------------------------------------------------ scheduling

    def _min_join_size(self) -> int:
        size = len(self.running)
        if size <= 1 or self.num_waiting_tokens >= self.max_waiting_tokens:
            return 1
        return max(1, size * (self.max_waiting_tokens - self.num_waiting_tokens) // self.max_waiting_tokens)

    def _pick_new(self, now: float) -> list[Sequence]:
        room = self.max_batch_size - len(self.running)
        if not self.waiting or room <= 0:
            return []
        if self.running:
            remaining = sum(s.remaining for s in self.running.values())
            if remaining < 2 or (self.next_prefill_after is not None and now <= self.next_prefill_after):
                return []
            min_size = self._min_join_size()
            if len(self.waiting) < min_size or len(self.running) + min_size > self.max_batch_size:
                return []
        return [self.waiting.popleft() for _ in range(min(room, len(self.waiting)))]

    def schedule(self, now: float | None = None) -> Step | None:
        """The next step for the workers, or None when there is nothing to do."""
        now = time.monotonic() if now is None else now
        new = self._pick_new(now)
        decode = bool(self.running)
        if not (new or decode or self.to_remove):
            return None
        for sequence in new:
            sequence.started_at = now
            self.running[sequence.request_id] = sequence
        self.num_steps += 1
        self._added = {s.request_id for s in new}
        self._in_step = list(self.running.values())
        step = Step(
            step_id=self.num_steps,
            add=[NewSequence(s.request_id, s.request.input_ids, s.request.logits) for s in new],
            remove=self.to_remove,
            decode=decode,
        )
        self.to_remove = []
        return step

    def stats(self, duration: float, forward_duration: float) -> StepStats:
        """Stats of the step in flight, in TGIS's terms, for the gateway's metrics."""
        added = [s for s in self._in_step if s.request_id in self._added]
        return StepStats(
            method="prefill" if added else "next_token",
            batch_size=len(self._in_step),
            duration=duration,
            forward_duration=forward_duration,
            prefill_tokens=sum(len(s.request.input_ids) for s in added),
            concatenated=bool(added) and len(added) < len(self._in_step),
        )

    def fill_gauges(self, stats: StepStats) -> StepStats:
        """Set the after-step state (batch and queue sizes) on `stats`."""
        stats.running = len(self.running)
        stats.queue_size = len(self.waiting)
        stats.batch_input_tokens = sum(len(s.request.input_ids) + s.generated for s in self.running.values())
        stats.batch_remaining_tokens = sum(s.remaining for s in self.running.values())
        return stats

    # ------------------------------------------------------------------ results

    def _stop_reason(self, sequence: Sequence, token_id: int, now: float) -> StopReason:
        stop = sequence.request.stop
        if stop.deadline and now > stop.deadline:
            return StopReason.TIME_LIMIT
        if sequence.generated < stop.min_new_tokens:
            return StopReason.NOT_FINISHED
        if token_id == self.eos_token_id:
            return StopReason.EOS_TOKEN
        if sequence.generated >= stop.max_new_tokens:
            return StopReason.TOKEN_LIMIT if stop.token_limited else StopReason.MAX_TOKENS
        return StopReason.NOT_FINISHED

    def complete_step(self, outputs: list[SequenceOutput], prefill_seconds: float | None = None) -> list[tuple[Sequence, TokenOutput]]:
        """Apply a step's tokens: count them, stop finished sequences, return the outputs to forward."""
        now_wall, now = time.time(), time.monotonic()
        if self._added:
            self.num_waiting_tokens = 1
            if prefill_seconds is not None and len(self._in_step) > len(self._added):
                self.next_prefill_after = now + prefill_seconds / 2
        else:
            self.num_waiting_tokens += 1
        forwarded = []
        for out in outputs:
            sequence = self.running.get(out.request_id)
            if sequence is None:  # cancelled while the step ran
                continue
            sequence.generated += 1
            reason = self._stop_reason(sequence, out.token.token_id, now_wall)
            first = sequence.generated == 1
            token_output = TokenOutput(
                out.request_id, [out.token], sequence.generated, reason,
                input_details=out.input_details,
                queue_duration=(sequence.started_at - sequence.queued_at) if first else 0.0,
            )
            if reason != StopReason.NOT_FINISHED:
                del self.running[out.request_id]
                self.to_remove.append(out.request_id)
            forwarded.append((sequence, token_output))
        self._in_step, self._added = [], set()
        if not self.running:
            self.next_prefill_after = None
        return forwarded

    def fail_step(self) -> list[Sequence]:
        """The workers lost or dropped the batch: every running sequence fails."""
        failed = list(self.running.values())
        self.running.clear()
        self.to_remove = []
        self._in_step, self._added = [], set()
        self.next_prefill_after = None
        return failed
