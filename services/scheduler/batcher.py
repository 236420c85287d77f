"""Queue and continuous batching over the KV block pool: who runs which tokens each step, when sequences stop.

No sockets here.  The policy for *when* waiting requests join follows TGIS's
router (`max_batch_size`, `max_waiting_tokens`, the prefill pause after a
join); *which* join follows TGIS's weight model (`admission.py`), then the
block pool: a request joins only when blocks for all its known tokens are
free (after reusing its longest cached prefix).  Each step runs one token for
every decoding sequence plus prompt chunks within `max_prefill_tokens`, so a
long prompt is prefilled over several steps while the others keep decoding.
When a decoding sequence needs a block and none is free, the newest running
sequence is preempted: its blocks are freed, and it waits at the head of the
queue to be recomputed (the workers keep its tokens and sampling state).
Stop conditions are checked here in TGIS order (time limit, min_new_tokens,
EOS, max tokens); stop sequences are the tokenizer's job.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import deque
from dataclasses import dataclass, field

from services.common.protocol import (
    GenerateRequest,
    NewSequence,
    ScheduledChunk,
    SequenceOutput,
    Step,
    StepStats,
    StopReason,
    TokenOutput,
    token_ids,
)
from services.scheduler.admission import MemoryModel, try_next_batch
from services.scheduler.blocks import BlockManager, BlockTable, blocks_for

log = logging.getLogger(__name__)


@dataclass
class Sequence:
    """A request's scheduling state: its tokens (prompt, then generated) and how many sit in its KV blocks."""

    request: GenerateRequest
    gateway: bytes
    queued_at: float = field(default_factory=time.monotonic)
    started_at: float = 0.0
    generated: int = 0
    tokens: list[int] = field(default_factory=list)
    computed: int = 0
    table: BlockTable = field(default_factory=BlockTable)
    on_workers: bool = False  # the workers hold its state (NewSequence sent, not removed)

    def __post_init__(self) -> None:
        if not self.tokens:
            self.tokens = list(self.request.input_ids)

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def remaining(self) -> int:
        return self.request.stop.max_new_tokens - self.generated

    # The admission weight model's view (admission.Entry).
    @property
    def input_length(self) -> int:
        return len(self.request.input_ids)

    @property
    def max_new_tokens(self) -> int:
        return self.request.stop.max_new_tokens

    @property
    def decoding(self) -> bool:
        return self.computed == len(self.tokens) - 1 and self.generated > 0

    @property
    def cache_root(self) -> bytes:
        """Where its blocks' hash chain starts: a root of its prompt prefix and LoRA adapter, so only sequences with
        both the same share blocks (an adapter changes every layer's K/V)."""
        request = self.request
        if not (request.prefix_id or request.adapter_id):
            return b""
        key = b"prompt prefix " + request.prefix_id.encode()
        if request.adapter_id:
            key += b"\0lora " + request.adapter_id.encode()
        return hashlib.blake2b(key, digest_size=16).digest()

    @property
    def one_chunk(self) -> bool:
        """Input token details need logits of the whole prompt from one forward pass."""
        return self.request.logits.input_details and self.generated == 0


@dataclass
class Finished:
    """A sequence that ended outside a step (timed out while queued)."""

    sequence: Sequence
    output: TokenOutput


@dataclass
class StepPlan:
    """What the step in flight holds, for its stats and results."""

    added: list[Sequence] = field(default_factory=list)
    prompt_tokens: int = 0
    counters: dict[str, int] = field(default_factory=dict)


class Batcher:
    """Holds the waiting queue, the running set and the block pool, and turns them into worker Steps."""

    def __init__(self, max_batch_size: int, max_waiting_tokens: int, eos_token_id: int, blocks: BlockManager,
                 memory: MemoryModel | None = None, max_prefill_tokens: int = 512,
                 max_prefill_tokens_while_decoding: int | None = None, max_loras: int = 0) -> None:
        self.max_batch_size = max_batch_size
        self.max_waiting_tokens = max_waiting_tokens
        self.eos_token_id = eos_token_id
        self.blocks = blocks
        self.memory = memory or MemoryModel.from_config("off", 0, 0, max_batch_size, 0)
        self.max_prefill_tokens = max_prefill_tokens
        # A smaller chunk while others decode: a step's time is their inter-token latency.
        self.max_prefill_tokens_while_decoding = min(max_prefill_tokens_while_decoding or max_prefill_tokens,
                                                     max_prefill_tokens)
        # Distinct LoRA adapters in the running batch (the workers keep that many loaded); 0: no limit.
        self.max_loras = max_loras
        self.waiting: deque[Sequence] = deque()
        self.running: dict[str, Sequence] = {}
        self.to_remove: list[str] = []
        self.num_waiting_tokens = 0
        self.next_prefill_after: float | None = None
        self.num_steps = 0
        self.plan = StepPlan()

    # ------------------------------------------------------------------ input

    def submit(self, gateway: bytes, requests: list[GenerateRequest]) -> None:
        for request in requests:
            self.waiting.append(Sequence(request, gateway))

    def _drop(self, sequence: Sequence) -> None:
        self.blocks.release(sequence.table)
        if sequence.on_workers:
            self.to_remove.append(sequence.request_id)
            sequence.on_workers = False

    def cancel(self, request_ids: list[str]) -> None:
        """Drop requests wherever they are; nobody waits for an answer."""
        ids = set(request_ids)
        for sequence in [s for s in self.waiting if s.request_id in ids]:
            self._drop(sequence)
        self.waiting = deque(s for s in self.waiting if s.request_id not in ids)
        for request_id in ids & self.running.keys():
            self._drop(self.running.pop(request_id))

    def drop_gateway(self, gateway: bytes) -> None:
        """A gateway vanished: its requests have no one to answer to."""
        self.cancel([s.request_id for s in [*self.waiting, *self.running.values()] if s.gateway == gateway])

    def expire_waiting(self, now: float | None = None) -> list[Finished]:
        """Requests whose deadline passed in the queue end with TIME_LIMIT (a preempted one keeps its tokens)."""
        now = time.time() if now is None else now
        expired = [s for s in self.waiting if s.request.stop.deadline and now > s.request.stop.deadline]
        if not expired:
            return []
        self.waiting = deque(s for s in self.waiting if s not in expired)
        finished = []
        for s in expired:
            self._drop(s)
            finished.append(Finished(s, TokenOutput(s.request_id, [], s.generated, StopReason.TIME_LIMIT,
                                                    queue_duration=time.monotonic() - s.queued_at)))
        return finished

    # ------------------------------------------------------------------ scheduling

    def _min_join_size(self) -> int:
        size = len(self.running)
        if size <= 1 or self.num_waiting_tokens >= self.max_waiting_tokens:
            return 1
        return max(1, size * (self.max_waiting_tokens - self.num_waiting_tokens) // self.max_waiting_tokens)

    def _may_join(self, now: float) -> bool:
        """TGIS's pause rules: waiting requests join a running batch only every so often."""
        if not self.waiting or len(self.running) >= self.max_batch_size:
            return False
        if not self.running:
            return True
        remaining = sum(s.remaining for s in self.running.values())
        return remaining >= 2 and (self.next_prefill_after is None or now > self.next_prefill_after)

    def _preempt_for(self, sequence: Sequence) -> bool:
        """Free blocks by preempting the newest running sequences until `sequence` can grow; False if it went itself."""
        while not self.blocks.grow(sequence.table, sequence.computed + 1):
            victim = next(reversed(self.running.values()))
            del self.running[victim.request_id]
            self.blocks.release(victim.table)
            victim.computed = 0
            self.waiting.appendleft(victim)
            self.plan.counters["preemptions"] = self.plan.counters.get("preemptions", 0) + 1
            log.info("no free KV block: preempted %s after %d tokens; it will be recomputed",
                     victim.request_id, victim.generated)
            if victim is sequence:
                return False
        return True

    def _admit(self, now: float, budget: int, cap: int) -> list[ScheduledChunk]:
        """Start waiting requests TGIS's policy and the weight model pick, while blocks and the budget last."""
        if not self._may_join(now):
            return []
        admission = try_next_batch(list(self.waiting), list(self.running.values()), self._min_join_size(),
                                   self.max_batch_size, self.memory, now)
        for name in ("queue_jumps", "granular_additions", "prefill_weight_exceeded"):
            self.plan.counters[name] = getattr(admission, name)
        chunks = []
        adapters = {s.request.adapter_id for s in self.running.values()} - {""}
        for sequence in admission.picked:
            adapter = sequence.request.adapter_id
            if adapter and self.max_loras and adapter not in adapters and len(adapters) >= self.max_loras:
                continue  # waits until a running adapter's sequences finish (vLLM's MAX_LORAS rule)
            length = len(sequence.tokens)
            if budget <= 0 or (sequence.one_chunk and budget < min(length, self.max_prefill_tokens)):
                break  # a prompt wanting input details longer than the budget runs when it has it all
            if cap <= 0 and not sequence.one_chunk and length > self.max_prefill_tokens_while_decoding:
                break  # a long prompt waits for the next step's cap (first come, first served)
            hit_blocks, hashes = ([], []) if sequence.one_chunk else self.blocks.cached_prefix(
                sequence.tokens, length - 1, sequence.cache_root)
            need = blocks_for(length, self.blocks.block_size) - len(hit_blocks) + self.blocks.usable(hit_blocks)
            if need > self.blocks.num_free:
                break
            self.blocks.take_prefix(sequence.table, hit_blocks, hashes)
            self.blocks.grow(sequence.table, length)
            sequence.computed = len(hit_blocks) * self.blocks.block_size
            self.plan.counters["prefix_queried_tokens"] = self.plan.counters.get("prefix_queried_tokens", 0) + length
            self.plan.counters["prefix_hit_tokens"] = self.plan.counters.get("prefix_hit_tokens", 0) + sequence.computed
            self.waiting.remove(sequence)
            if sequence.started_at == 0.0:
                sequence.started_at = now
            self.running[sequence.request_id] = sequence
            self.plan.added.append(sequence)
            if adapter:
                adapters.add(adapter)
            count, long = self._prompt_chunk(sequence, budget, cap)
            chunks.append(self._chunk(sequence, count))
            budget, cap = budget - count, cap - count if long else cap
        return chunks

    def _prompt_chunk(self, sequence: Sequence, budget: int, cap: int) -> tuple[int, bool]:
        """How many prompt tokens `sequence` computes this step, and whether the long-prompt cap applies to it.

        A prompt wanting input details runs whole; one with at most MAX_PREFILL_TOKENS_WHILE_DECODING tokens left
        runs whole within the budget (short prompts arriving together all get their first token soon); a longer
        one is chunked by the cap too.
        """
        remaining = len(sequence.tokens) - sequence.computed
        if sequence.one_chunk:
            return remaining, False
        if remaining <= self.max_prefill_tokens_while_decoding:
            return min(remaining, budget), False
        return min(remaining, budget, cap), True

    def _chunk(self, sequence: Sequence, count: int) -> ScheduledChunk:
        start = sequence.computed
        sequence.computed += count
        self.blocks.register(sequence.table, sequence.tokens, sequence.computed, sequence.cache_root)
        if not sequence.decoding and start < len(sequence.request.input_ids):
            self.plan.prompt_tokens += min(count, len(sequence.request.input_ids) - start)
        return ScheduledChunk(sequence.request_id, start, count, token_ids(sequence.table.blocks))

    def schedule(self, now: float | None = None) -> Step | None:
        """The next step for the workers, or None when there is nothing to do."""
        now = time.monotonic() if now is None else now
        self.plan = StepPlan()
        chunks = []
        for sequence in list(self.running.values()):
            if sequence.request_id in self.running and sequence.decoding and self._preempt_for(sequence):
                chunks.append(self._chunk(sequence, 1))
        # `budget` bounds all prompt tokens of the step; `cap`, lower while sequences decode (the chunks so far are
        # their decodes), bounds the chunks of long prompts, the ones that would stall those sequences.
        budget = self.max_prefill_tokens
        cap = self.max_prefill_tokens_while_decoding if chunks else budget
        for sequence in list(self.running.values()):
            if budget > 0 and not sequence.decoding and sequence.computed < len(sequence.tokens):
                count, long = self._prompt_chunk(sequence, budget, cap)
                if count > 0:
                    chunks.append(self._chunk(sequence, count))
                    budget, cap = budget - count, cap - count if long else cap
        if not self.plan.counters.get("preemptions"):  # blocks just ran out: nobody joins this step
            chunks += self._admit(now, budget, cap)
        if not (chunks or self.to_remove):
            return None
        new = [s for s in self.plan.added if not s.on_workers]
        for sequence in new:
            sequence.on_workers = True
        self.num_steps += 1
        step = Step(self.num_steps, [NewSequence(s.request_id, token_ids(s.tokens), s.request.logits, s.request.prefix_id,
                                             s.request.prefix_length, s.request.adapter_id) for s in new],
                    self.to_remove, chunks)
        self.to_remove = []
        return step

    def stats(self, duration: float, forward_duration: float) -> StepStats:
        """Stats of the step in flight, in TGIS's terms, for the gateway's metrics."""
        added = len(self.plan.added)
        return StepStats(
            method="prefill" if self.plan.prompt_tokens else "next_token",
            batch_size=len(self.running),
            duration=duration,
            forward_duration=forward_duration,
            prefill_tokens=self.plan.prompt_tokens,
            concatenated=bool(added) and added < len(self.running),
            **self.plan.counters,
        )

    def fill_gauges(self, stats: StepStats) -> StepStats:
        """Set the after-step state (batch and queue sizes) on `stats`."""
        stats.running = len(self.running)
        stats.queue_size = len(self.waiting)
        stats.batch_input_tokens = sum(len(s.tokens) for s in self.running.values())
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

    def complete_step(self, outputs: list[SequenceOutput], failed: dict[str, str] | None = None,
                      prefill_seconds: float | None = None) -> tuple[list[tuple[Sequence, TokenOutput]],
                                                                     list[tuple[Sequence, str]]]:
        """Apply a step's tokens and per-request failures; return the outputs to forward and the failures."""
        now_wall, now = time.time(), time.monotonic()
        if self.plan.added:
            self.num_waiting_tokens = 1
            if prefill_seconds is not None and len(self.running) > len(self.plan.added):
                self.next_prefill_after = now + prefill_seconds / 2
        else:
            self.num_waiting_tokens += 1
        failures = []
        for request_id, message in (failed or {}).items():
            sequence = self.running.pop(request_id, None)
            if sequence is not None:
                self.blocks.release(sequence.table)
                sequence.on_workers = False  # the worker already forgot it
                failures.append((sequence, message))
        forwarded = []
        for out in outputs:
            sequence = self.running.get(out.request_id)
            if sequence is None:  # cancelled or preempted while the step ran
                continue
            sequence.generated += 1
            sequence.tokens.append(out.token.token_id)
            reason = self._stop_reason(sequence, out.token.token_id, now_wall)
            first = sequence.generated == 1
            token_output = TokenOutput(
                out.request_id, [out.token], sequence.generated, reason,
                input_details=out.input_details,
                queue_duration=(sequence.started_at - sequence.queued_at) if first else 0.0,
            )
            if reason != StopReason.NOT_FINISHED:
                self._drop(self.running.pop(out.request_id))
            forwarded.append((sequence, token_output))
        if not self.running:
            self.next_prefill_after = None
        return forwarded, failures

    def fail_step(self) -> list[Sequence]:
        """The workers lost or dropped their state: every sequence they held fails; the block pool starts over."""
        failed = list(self.running.values()) + [s for s in self.waiting if s.on_workers]
        self.waiting = deque(s for s in self.waiting if not s.on_workers)
        self.running.clear()
        self.to_remove = []
        self.plan = StepPlan()
        self.next_prefill_after = None
        self.blocks.reset()
        for sequence in self.waiting:
            sequence.table = BlockTable()
        return failed
