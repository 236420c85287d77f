"""The protocol's base: version, token-id arrays, `Wire`, message kinds, stop reasons, structs the links share."""

from __future__ import annotations

import array
import enum

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
