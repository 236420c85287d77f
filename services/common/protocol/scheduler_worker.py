"""Scheduler <-> worker messages: rank hello/welcome/ready, steps and their results or failures, heartbeats, shutdown."""

from __future__ import annotations

from typing import ClassVar

from msgspec import field

from services.common.protocol.base import (
    PROTOCOL_VERSION,
    LogitsParams,
    MessageKind,
    ModelInfo,
    TokenDetail,
    TokenIds,
    Wire,
)

# --------------------------------------------------------------------------- scheduler <-> workers


class WorkerHello(Wire):
    """Rank -> scheduler, repeated until the rank's subscription delivers a Welcome."""

    KIND: ClassVar[MessageKind] = MessageKind.WORKER_HELLO
    rank: int
    world_size: int
    version: int = PROTOCOL_VERSION


class Welcome(Wire):
    """Scheduler -> ranks (PUB): proves the rank's subscription is live."""

    KIND: ClassVar[MessageKind] = MessageKind.WELCOME
    rank: int


class WorkerReady(Wire):
    """Rank -> scheduler: weights loaded, ready for steps; the KV block pool this rank allocated.

    The scheduler owns block allocation: it hands out block ids 0..num_blocks-1
    of `block_size` token positions each (the smallest pool over the ranks).
    """

    KIND: ClassVar[MessageKind] = MessageKind.WORKER_READY
    rank: int
    model: ModelInfo
    num_blocks: int = 0
    block_size: int = 0


class NewSequence(Wire):
    """A sequence the workers have not seen yet: its prompt and sampling settings (its chunks come in `Step.run`)."""

    request_id: str
    input_ids: TokenIds
    logits: LogitsParams
    # The prompt prefix whose embeddings replace those of the first prefix_length input ids (placeholders).
    prefix_id: str = ""
    prefix_length: int = 0
    adapter_id: str = ""  # the LoRA adapter its rows go through (LoRA runs per row: sequences may differ)


class ScheduledChunk(Wire):
    """Compute `count` tokens of one sequence this step, from position `start` (the tokens before are in its KV blocks).

    A sequence's tokens are its prompt followed by the tokens it generated; a
    chunk that reaches the last known token samples the next one.  A decode is
    the chunk (start = length - 1, count = 1); a prompt may take several chunks
    (chunked prefill), may start after a cached prefix (prefix caching), and a
    preempted sequence starts again at 0 (recompute).  `block_table` lists the
    KV block ids holding positions 0, block_size, 2*block_size, ... up to
    start + count.
    """

    request_id: str
    start: int
    count: int
    block_table: TokenIds


class Step(Wire):
    """Scheduler -> all ranks: forget `remove`, register `add`, then run every chunk of `run` in one forward pass.

    Every rank applies the same steps in the same order, so their state stays
    identical; only rank 0 answers.
    """

    KIND: ClassVar[MessageKind] = MessageKind.STEP
    step_id: int
    add: list[NewSequence]
    remove: list[str]
    run: list[ScheduledChunk]


class SequenceOutput(Wire):
    """One sequence's new token from a step (and its input details after prefill)."""

    request_id: str
    token: TokenDetail
    input_details: list[TokenDetail] | None = None


class StepResult(Wire):
    """Rank 0 -> scheduler: the outputs of one step (one per chunk that sampled).

    `failed` maps the request ids the worker refused or could not run to why;
    they fail alone, the rest of the step ran.
    """

    KIND: ClassVar[MessageKind] = MessageKind.STEP_RESULT
    step_id: int
    outputs: list[SequenceOutput]
    forward_ns: int
    failed: dict[str, str] = field(default_factory=dict)


class StepFailed(Wire):
    """A rank -> scheduler: the step raised; the worker has dropped its whole batch."""

    KIND: ClassVar[MessageKind] = MessageKind.STEP_FAILED
    step_id: int
    rank: int
    message: str
    out_of_memory: bool = False


class Heartbeat(Wire):
    """Periodic liveness from a worker rank or tokenizer process.

    Receivers know the sender by the connection it said hello on; `sender` only names it in logs.
    """

    KIND: ClassVar[MessageKind] = MessageKind.HEARTBEAT
    sender: str


class Shutdown(Wire):
    """Scheduler -> ranks: exit cleanly."""

    KIND: ClassVar[MessageKind] = MessageKind.SHUTDOWN
    reason: str = ""
