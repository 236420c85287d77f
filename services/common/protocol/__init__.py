"""Every message that crosses a process boundary, defined once.

Each top-level message travels as two ZeroMQ frames: a 1-byte `MessageKind`
and a msgpack body (see `codec.py`).  Every struct is a `msgspec.Struct`
encoded as a positional msgpack array, so the receiver decodes each kind
against its declared field types and refuses any other shape.  Token ids
travel as packed int32 arrays (`TokenIds`), not as lists of msgpack integers.

Peers (see docs/architecture.md for the full flow):
  gateway  <-> scheduler   ROUTER (scheduler) / DEALER (gateway)
  gateway  <-> tokenizers  ROUTER (gateway)   / DEALER (tokenizer)
  scheduler -> workers     PUB (scheduler)    / SUB (every rank)
  workers  -> scheduler    ROUTER (scheduler) / DEALER (every rank; rank 0 sends results)
"""

from __future__ import annotations

import array
import enum
from typing import ClassVar

from msgspec import Struct, field

PROTOCOL_VERSION = 1


def token_ids(values=()) -> array.array:
    """Return `values` as the compact int32 array used for token ids on the wire."""
    return values if isinstance(values, array.array) and values.typecode == "i" else array.array("i", values)


TokenIds = array.array


class Wire(Struct, array_like=True, forbid_unknown_fields=True):
    """Base of every struct on the wire: fields travel by position, extra or missing ones are refused."""


class MessageKind(enum.IntEnum):
    """First frame of every message: which top-level struct the body holds."""

    # gateway <-> scheduler
    GATEWAY_HELLO = 1
    SCHEDULER_INFO = 2
    SUBMIT = 3
    CANCEL = 4
    TOKEN_BATCH = 5
    REQUEST_FAILED = 6
    PING = 7
    PONG = 8
    # scheduler <-> workers
    WORKER_HELLO = 20
    WELCOME = 21
    WORKER_READY = 22
    STEP = 23
    STEP_RESULT = 24
    STEP_FAILED = 25
    HEARTBEAT = 26
    SHUTDOWN = 27
    # gateway <-> tokenizers
    TOKENIZER_HELLO = 40
    TOKENIZER_GOODBYE = 41
    TOKENIZE = 42
    TOKENIZE_RESULT = 43
    DETOK_OPEN = 44
    DETOK_TOKENS = 45
    DETOK_RESULT = 46
    DETOK_CLOSE = 47


class StopReason(enum.IntEnum):
    """Why a sequence stopped; values equal the fmaas `StopReason` proto enum."""

    NOT_FINISHED = 0
    MAX_TOKENS = 1
    EOS_TOKEN = 2
    CANCELLED = 3
    TIME_LIMIT = 4
    STOP_SEQUENCE = 5
    TOKEN_LIMIT = 6
    ERROR = 7

    def __str__(self) -> str:
        return self.name


# --------------------------------------------------------------------------- shared structs


class ModelInfo(Wire):
    """What the worker group reports about the loaded model (sent to the scheduler, then gateways)."""

    model_name: str
    model_path: str
    encoder_decoder: bool
    vocab_size: int
    eos_token_id: int
    pad_token_id: int
    max_sequence_length: int
    max_new_tokens: int
    max_batch_size: int
    world_size: int
    device: str
    dtype: str
    hidden_size: int = 0  # embedding width: what a prompt prefix's embeddings must match
    max_loras: int = 0  # LoRA adapters loaded at once per rank (MAX_LORAS); 0: no ADAPTER_CACHE, adapters off
    # Layers LoRA adapters may target, by checkpoint leaf name (q_proj, ...) -> [in, out]; empty: none on this model.
    lora_modules: dict[str, list[int]] = field(default_factory=dict)


class GuideKind(enum.IntEnum):
    """Guided decoding's constraint kinds (the vLLM TGIS adapter's `DecodingParameters.guided`)."""

    NONE = 0
    JSON = 1  # any JSON object; the text is empty
    JSON_SCHEMA = 2
    REGEX = 3
    GRAMMAR = 4  # EBNF (xgrammar's dialect); choices arrive as a grammar of alternatives

    def __str__(self) -> str:
        return self.name.lower()


class LogitsParams(Wire):
    """Per-sequence logits processing and sampling settings (TGIS semantics, already converted).

    temperature 0 means greedy; top_k 0, top_p 1.0, typical_p <= 0 or >= 1 and
    repetition_penalty 1.0 mean "off".
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    typical_p: float = 0.0
    seed: int = 0
    repetition_penalty: float = 1.0
    length_penalty_start: int = 0
    length_penalty_decay: float = 0.0  # 0 = no length penalty
    min_new_tokens: int = 0
    token_logprobs: bool = False
    token_ranks: bool = False
    top_n_tokens: int = 0
    generated_details: bool = False
    input_details: bool = False
    # Guided decoding: generated tokens must keep the output inside this constraint (its text: schema, regex, grammar).
    guide_kind: GuideKind = GuideKind.NONE
    guide: str = ""

    @property
    def sampling(self) -> bool:
        return self.temperature != 0.0


class StopParams(Wire):
    """When the scheduler ends a sequence (stop sequences are the tokenizer's job)."""

    max_new_tokens: int
    min_new_tokens: int = 0
    # Wall-clock (time.time()) deadline; 0 = none.  Wall clock because it crosses processes.
    deadline: float = 0.0
    # max_new_tokens was lowered to fit max_sequence_length: reaching it is TOKEN_LIMIT.
    token_limited: bool = False


class TokenDetail(Wire):
    """One token's id with the details asked for (logprob, rank, top-n alternatives)."""

    token_id: int
    logprob: float = 0.0
    rank: int = 0
    top_ids: TokenIds = field(default_factory=token_ids)
    top_logprobs: list[float] = field(default_factory=list)


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


MESSAGE_TYPES: dict[MessageKind, type] = {
    cls.KIND: cls
    for cls in (
        GatewayHello, SchedulerInfo, Submit, Cancel, TokenBatch, RequestFailed, Ping, Pong,
        WorkerHello, Welcome, WorkerReady, Step, StepResult, StepFailed, Heartbeat, Shutdown,
        TokenizerHello, TokenizerGoodbye, Tokenize, TokenizeResult,
        DetokOpen, DetokTokens, DetokResult, DetokClose,
    )
}
