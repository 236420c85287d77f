"""Gateway <-> scheduler messages: hello and model info, submitted requests, cancels, token batches, failures, ping/pong."""

from __future__ import annotations

from typing import ClassVar

from services.common.protocol.base import (
    PROTOCOL_VERSION,
    LogitsParams,
    MessageKind,
    ModelInfo,
    StopParams,
    StopReason,
    TokenDetail,
    TokenIds,
    Wire,
)

# --------------------------------------------------------------------------- gateway <-> scheduler


class GatewayHello(Wire):
    """Gateway -> scheduler: a gateway connected; the scheduler answers with SchedulerInfo once a model is loaded."""

    KIND: ClassVar[MessageKind] = MessageKind.GATEWAY_HELLO
    gateway_id: str
    version: int = PROTOCOL_VERSION


class SchedulerInfo(Wire):
    """Scheduler -> gateway: the model and limits this pipeline serves."""

    KIND: ClassVar[MessageKind] = MessageKind.SCHEDULER_INFO
    model: ModelInfo
    max_waiting_tokens: int


class GenerateRequest(Wire):
    """One validated input, tokenized and ready to queue."""

    request_id: str
    input_ids: TokenIds
    logits: LogitsParams
    stop: StopParams
    arrival_time: float  # time.time() when the gateway received the call
    # A prompt prefix: input_ids start with prefix_length placeholder (pad) ids whose embeddings it replaces.
    prefix_id: str = ""
    prefix_length: int = 0
    adapter_id: str = ""  # a LoRA adapter in ADAPTER_CACHE, already checked by the gateway


class Submit(Wire):
    """Gateway -> scheduler: the inputs of one gRPC call, queued together."""

    KIND: ClassVar[MessageKind] = MessageKind.SUBMIT
    requests: list[GenerateRequest]


class Cancel(Wire):
    """Gateway -> scheduler: stop these requests (client gone, or a stop sequence matched)."""

    KIND: ClassVar[MessageKind] = MessageKind.CANCEL
    request_ids: list[str]


class StepStats(Wire):
    """Scheduler's view of one step, carried to the gateway for its metrics."""

    method: str  # "prefill" (the step added sequences) or "next_token"
    batch_size: int  # sequences in this step
    duration: float  # seconds, scheduler send -> result
    forward_duration: float  # seconds, reported by the worker
    prefill_tokens: int = 0
    concatenated: bool = False
    # Admission and KV block pool events of this step (counters on the gateway).
    queue_jumps: int = 0
    granular_additions: int = 0
    prefill_weight_exceeded: int = 0
    preemptions: int = 0
    prefix_queried_tokens: int = 0
    prefix_hit_tokens: int = 0
    # State after the step, for the gauges.
    running: int = 0
    queue_size: int = 0
    batch_input_tokens: int = 0
    batch_remaining_tokens: int = 0


class TokenOutput(Wire):
    """New tokens for one request; `stop_reason` set on its last output.

    `generated_count` is the running total including `tokens`.  `input_details`
    comes once, with the first token, when input token details were asked for.
    """

    request_id: str
    tokens: list[TokenDetail]
    generated_count: int
    stop_reason: StopReason = StopReason.NOT_FINISHED
    input_details: list[TokenDetail] | None = None
    queue_duration: float = 0.0  # set on the first output: seconds spent queued


class TokenBatch(Wire):
    """Scheduler -> gateway: one step's outputs for that gateway's requests, plus step stats."""

    KIND: ClassVar[MessageKind] = MessageKind.TOKEN_BATCH
    outputs: list[TokenOutput]
    stats: StepStats | None = None


class RequestFailed(Wire):
    """Scheduler -> gateway: these requests failed during generation."""

    KIND: ClassVar[MessageKind] = MessageKind.REQUEST_FAILED
    request_ids: list[str]
    message: str
    # The replica lost (or has no) worker group, so the requests never ran to an end there: a gateway may re-send
    # those that produced no token yet to another replica. False: the request itself failed (stays failed).
    retryable: bool = False


class Ping(Wire):
    """Liveness probe through a hop; answered with Pong carrying the same nonce."""

    KIND: ClassVar[MessageKind] = MessageKind.PING
    nonce: int


class Pong(Wire):
    KIND: ClassVar[MessageKind] = MessageKind.PONG
    nonce: int
    workers_ready: bool = True
    queue_size: int = 0
    batch_size: int = 0
