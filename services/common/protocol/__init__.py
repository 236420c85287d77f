"""Every message that crosses a process boundary, defined once: the one message schema, split by link.

Each top-level message travels as two ZeroMQ frames: a 1-byte `MessageKind`
and a msgpack body (see `codec.py`).  Every struct is a `msgspec.Struct`
encoded as a positional msgpack array, so the receiver decodes each kind
against its declared field types and refuses any other shape.  Token ids
travel as packed int32 arrays (`TokenIds`), not as lists of msgpack integers.

`base` holds the version, `Wire`, `MessageKind`, `StopReason` and the shared
structs; `gateway_scheduler`, `scheduler_worker` and `gateway_tokenizer` hold
the messages of each link.  This package re-exports every name and keeps
`MESSAGE_TYPES`, the kind -> class table the codec decodes by.

Peers (see docs/architecture.md for the full flow):
  gateway  <-> scheduler   ROUTER (scheduler) / DEALER (gateway)
  gateway  <-> tokenizers  ROUTER (gateway)   / DEALER (tokenizer)
  scheduler -> workers     PUB (scheduler)    / SUB (every rank)
  workers  -> scheduler    ROUTER (scheduler) / DEALER (every rank; rank 0 sends results)
"""

from __future__ import annotations

from services.common.protocol.base import (
    PROTOCOL_VERSION,
    GuideKind,
    LogitsParams,
    MessageKind,
    ModelInfo,
    StopParams,
    StopReason,
    TokenDetail,
    TokenIds,
    Wire,
    token_ids,
)
from services.common.protocol.gateway_scheduler import (
    Cancel,
    GatewayHello,
    GenerateRequest,
    Ping,
    Pong,
    RequestFailed,
    SchedulerInfo,
    StepStats,
    Submit,
    TokenBatch,
    TokenOutput,
)
from services.common.protocol.gateway_tokenizer import (
    DetokClose,
    DetokDelta,
    DetokItem,
    DetokOpen,
    DetokParams,
    DetokResult,
    DetokTokens,
    Tokenize,
    TokenizedText,
    TokenizeResult,
    TokenizerGoodbye,
    TokenizerHello,
)
from services.common.protocol.scheduler_worker import (
    Heartbeat,
    NewSequence,
    ScheduledChunk,
    SequenceOutput,
    Shutdown,
    Step,
    StepFailed,
    StepResult,
    Welcome,
    WorkerHello,
    WorkerReady,
)

MESSAGE_TYPES: dict[MessageKind, type] = {
    cls.KIND: cls
    for cls in (
        GatewayHello, SchedulerInfo, Submit, Cancel, TokenBatch, RequestFailed, Ping, Pong,
        WorkerHello, Welcome, WorkerReady, Step, StepResult, StepFailed, Heartbeat, Shutdown,
        TokenizerHello, TokenizerGoodbye, Tokenize, TokenizeResult,
        DetokOpen, DetokTokens, DetokResult, DetokClose,
    )
}

__all__ = [
    # base
    "PROTOCOL_VERSION",
    "token_ids",
    "TokenIds",
    "Wire",
    "MessageKind",
    "StopReason",
    "ModelInfo",
    "GuideKind",
    "LogitsParams",
    "StopParams",
    "TokenDetail",
    # gateway_scheduler
    "GatewayHello",
    "SchedulerInfo",
    "GenerateRequest",
    "Submit",
    "Cancel",
    "StepStats",
    "TokenOutput",
    "TokenBatch",
    "RequestFailed",
    "Ping",
    "Pong",
    # scheduler_worker
    "WorkerHello",
    "Welcome",
    "WorkerReady",
    "NewSequence",
    "ScheduledChunk",
    "Step",
    "SequenceOutput",
    "StepResult",
    "StepFailed",
    "Heartbeat",
    "Shutdown",
    # gateway_tokenizer
    "TokenizerHello",
    "TokenizerGoodbye",
    "TokenizedText",
    "Tokenize",
    "TokenizeResult",
    "DetokParams",
    "DetokOpen",
    "DetokItem",
    "DetokTokens",
    "DetokDelta",
    "DetokResult",
    "DetokClose",
    # the kind -> class table
    "MESSAGE_TYPES",
]
