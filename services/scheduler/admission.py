"""Admission of waiting sequences by memory: TGIS's weight model and its `try_next_batch` (spec §4.2, §4.4).

Pure logic with no sockets and no torch: the batcher passes its waiting and running sequences and gets back the
ones to start.  Batches here are never padded, so the model is TGIS's *flash* one: a sequence of `in` tokens that
may generate `out` more weighs `(in + out) · g`, a prefill of `Σin` prompt tokens weighs `Σin · gp`, and TGIS's
padding limit is off.

`ESTIMATE_MEMORY` picks the coefficients, as in TGIS's `memory_characterizer.py`:

* `off`: coefficients 0 and no weight limit; only `max_batch_size` limits the batch.
* `manual`: TGIS's `manual_linear`.  The capacity is `max_sequence_length × max_batch_size` tokens, expressed in
  percent; the safety margin shrinks the coefficient *and* the limit, so with margin 20 only about 64% of that
  capacity fits (TGIS does the same; integration tests rely on it).
* `auto`: TGIS measures peak GPU memory over trial batches and fits curves.  We do not: the scheduler owns a
  paged KV block pool whose size is exact, and the memory a sequence holds is its KV token positions.  So the
  weight is KV token positions (`g = gp = 1`) and the limit is `floor((1 − margin/100) · kv_pool_tokens)`.  The
  margin covers what the weight model does not see: the partly filled last block of every sequence and blocks
  held by the prefix cache.  Preemption remains the backstop when blocks still run out.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

# An entry that fits may overtake skipped ones only if it was queued within this many seconds after the first
# skipped one (TGIS's CUTOFF_DURATION), so a large request is not starved by a stream of small ones.
CUTOFF_DURATION = 1.0
ESTIMATE_MEMORY_MODES = ("auto", "manual", "off")


class Entry(Protocol):
    """A queued or running sequence, as the batcher holds it."""

    input_length: int  # prompt tokens (+ prefix tokens later)
    max_new_tokens: int
    generated: int  # tokens generated so far (0 when queued)
    queued_at: float  # time.monotonic() when queued


def check_settings(mode: str, batch_safety_margin: int) -> None:
    """Refuse an unknown ESTIMATE_MEMORY mode (TGIS's message) or a margin that is not a percentage below 100."""
    if mode not in ESTIMATE_MEMORY_MODES:
        raise ValueError("valid options for ESTIMATE_MEMORY are auto, manual, and off")
    if not 0 <= batch_safety_margin < 100:
        raise ValueError(f"batch_safety_margin must be a percentage in [0, 100), got {batch_safety_margin}")


def _as_float32(value: float) -> float:
    # TGIS's shard sends the coefficients to the router as protobuf `float`s; rounding the same way keeps the
    # exact admission boundaries (1600 × f32(0.05) exceeds 80, 1600 × 0.05 does not).
    return struct.unpack("f", struct.pack("f", value))[0]


def _weight_limit(batch_safety_margin: int, free_memory: int) -> int:
    return math.floor((1.0 - batch_safety_margin / 100.0) * free_memory)


@dataclass(frozen=True)
class MemoryModel:
    """TGIS's flash-batch memory model (spec §4.4): weights grow linearly with tokens; 0 limit = no limit."""

    prefill_linear: float  # gp
    next_token_linear: float  # g (TGIS's nexttoken_linear_coef1)
    weight_limit: int

    @classmethod
    def from_config(cls, mode: str, batch_safety_margin: int, max_sequence_length: int,
                    max_batch_size: int, kv_pool_tokens: int) -> MemoryModel:
        """The model for an ESTIMATE_MEMORY mode; `kv_pool_tokens` (blocks × block size) is used by `auto` only."""
        check_settings(mode, batch_safety_margin)
        if mode == "off":
            return cls(0.0, 0.0, 0)
        if mode == "manual":
            # TGIS computes the share as (100 - margin) / 100 here and the limit as 1 - margin/100; keep both forms.
            share = (100.0 - batch_safety_margin) / 100.0
            linear = _as_float32(100.0 / (share * max_sequence_length * max_batch_size))
            return cls(linear, linear, _weight_limit(batch_safety_margin, 100))
        limit = _weight_limit(batch_safety_margin, kv_pool_tokens)
        if limit <= 0:
            raise ValueError(f"the KV block pool ({kv_pool_tokens} tokens) leaves no room for sequences "
                             f"with a {batch_safety_margin}% batch safety margin")
        return cls(1.0, 1.0, limit)

    def check_startup(self, max_sequence_length: int) -> None:
        """A single request of `max_sequence_length` tokens must fit, as TGIS's router checks before serving."""
        if self.prefill_weight(max_sequence_length) > self.weight_limit:
            raise ValueError(f"The provided max_sequence length ({max_sequence_length}) results in a prefill batch "
                             f"weight that exceeds the estimated capacity ({self.weight_limit})")
        if self.initial_weight(max_sequence_length) > self.weight_limit:
            raise ValueError(f"The provided max_sequence length ({max_sequence_length}) results in a next-token "
                             f"batch weight that exceeds the estimated capacity ({self.weight_limit})")

    # The weights truncate to integers, as TGIS's `as usize` does.
    def batch_max_weight(self, total_in: int, total_out: int) -> int:
        """Worst-case weight of a batch: every sequence at its full length at once."""
        return int((total_in + total_out) * self.next_token_linear)

    def initial_weight(self, total_in: int) -> int:
        """Weight of a batch's current tokens (inputs plus tokens generated so far)."""
        return int(total_in * self.next_token_linear)

    def prefill_weight(self, total_in: int) -> int:
        """Weight of one prefill forward pass over `total_in` prompt tokens."""
        return int(total_in * self.prefill_linear)

    def exceeds_weight(self, shapes: Iterable[tuple[int, int]], candidate_out: int) -> bool:
        """Whether a batch of `(remaining_out, current_len)` shapes ever exceeds the limit as it generates.

        Sequences finish in order of remaining output, so the batch is largest just before one finishes: walking
        from the longest remaining output down, the `k` longest-running sequences hold `S + k · out` tokens when
        the k-th finishes.  Points with `out > candidate_out` were checked before the candidate was added.
        """
        if not self.weight_limit:
            return False
        total_len = 0
        for count, (out, length) in enumerate(sorted(shapes, reverse=True), start=1):
            total_len += length
            if out <= candidate_out and (total_len + count * out) * self.next_token_linear > self.weight_limit:
                return True
        return False


@dataclass
class Admission:
    """Result of one `try_next_batch`; the counters count as TGIS's do even when nothing is picked."""

    picked: list = field(default_factory=list)  # entries to start, in queue order
    queue_jumps: int = 0  # tgi_queue_jump
    granular_additions: int = 0  # tgi_granular_batch_addition
    prefill_weight_exceeded: int = 0  # tgi_prefill_weight_limit_exceeded


def try_next_batch(waiting: Sequence[Entry], running: Sequence[Entry], min_size: int, size_limit: int,
                   model: MemoryModel, now: float) -> Admission:
    """Pick waiting entries to join the running ones, TGIS's `try_next_batch` for flash batches (spec §4.2).

    `now` is part of the batcher's interface but TGIS's policy does not read it: the cutoff compares queue times only.
    """
    result = Admission()
    # 1. Enough waiting entries, and room for them under the batch size?
    if len(waiting) < min_size or len(running) + min_size > size_limit:
        return result
    total = len(running)
    batch_in = sum(e.input_length + e.generated for e in running)
    batch_out = sum(e.max_new_tokens - e.generated for e in running)
    limit = model.weight_limit
    # 2. A prefill may only use the share of the limit that the running batch's current tokens leave free.
    prefill_limit = limit
    if limit and total:
        prefill_limit = max(0, int((1.0 - model.initial_weight(batch_in) / limit) * limit))
        if prefill_limit == 0:
            return result
    # 3. FIFO walk; entries that do not fit are skipped, and later ones may jump them until the cutoff.
    shapes: list[tuple[int, int]] | None = None  # (remaining_out, current_len) of running + picked, built lazily
    cutoff: float | None = None
    prefill_in = 0
    for index, entry in enumerate(waiting):
        if cutoff is not None and entry.queued_at > cutoff:
            break
        in_len, out_len = entry.input_length, entry.max_new_tokens
        if limit and model.batch_max_weight(batch_in + in_len, batch_out + out_len) > limit:
            # The worst case (all at full length together) is too heavy; check the real shape over time.
            if shapes is None:
                shapes = [(e.max_new_tokens - e.generated, e.input_length + e.generated)
                          for e in (*running, *result.picked)]
            if model.exceeds_weight([*shapes, (out_len, in_len)], out_len):
                if len(result.picked) + len(waiting) - index - 1 < min_size:
                    result.picked = []  # the rest of the queue can no longer reach min_size
                    return result
                if cutoff is None:
                    cutoff = entry.queued_at + CUTOFF_DURATION
                continue
            result.granular_additions += 1
        if cutoff is not None:
            result.queue_jumps += 1
        if prefill_limit:
            if model.prefill_weight(prefill_in + in_len) > prefill_limit:
                # TGIS counts tgi_prefill_weight_limit_exceeded once for the weight and once more for the skip.
                result.prefill_weight_exceeded += 2
                if cutoff is None:
                    cutoff = entry.queued_at + CUTOFF_DURATION
                continue
            prefill_in += in_len
        if shapes is not None:
            shapes.append((out_len, in_len))
        batch_in += in_len
        batch_out += out_len
        result.picked.append(entry)
        total += 1
        if total >= size_limit:
            break
    return result
