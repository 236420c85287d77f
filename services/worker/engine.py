"""The worker's engine: the model, the running batch's KV cache and sequences, and one `Step` at a time.

No sockets here: `main.py` feeds it steps.  Sequences occupy KV cache slots
0..B-1 in the order of `self.sequences`; removing one moves the last into its
slot so the batch stays contiguous.  A step's new sequences are prefilled
together, in as few forward passes as `max_prefill_tokens` allows, and their
first tokens chosen in one vectorized call.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from services.common.model_path import resolve_model_path
from services.common.protocol import (
    LogitsParams,
    ModelInfo,
    NewSequence,
    SequenceOutput,
    Step,
    StepResult,
    token_ids,
)
from services.worker.checkpoint import load_model
from services.worker.config import WorkerConfig
from services.worker.model import KVCache
from services.worker.sampling import BatchParams, choose, input_details, make_generator, process, token_detail

logger = logging.getLogger(__name__)

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
MAX_LENGTH_KEYS = (
    "max_position_embeddings", "n_positions", "max_seq_len", "seq_length",
    "max_sequence_length", "max_seq_length", "seq_len",
)
DEFAULT_MAX_SEQUENCE_LENGTH = 2048


def resolve_device(name: str, rank: int = 0) -> torch.device:
    """'auto' is this rank's local GPU when there is one, else the CPU."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", rank % torch.cuda.device_count()))
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """The weights dtype: `name` if given, else float16 on GPUs and float32 elsewhere."""
    if name is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"Unrecognized data type: {name}")
    return DTYPES[name]


def model_max_length(model_config: dict) -> int:
    """The context length a config.json declares (under one of its many names), else 2048."""
    for key in MAX_LENGTH_KEYS:
        if isinstance(model_config.get(key), int):
            return model_config[key]
    return DEFAULT_MAX_SEQUENCE_LENGTH


def _first(value: int | list[int] | None) -> int | None:
    return value[0] if isinstance(value, list) else value


@dataclass
class Sequence:
    """A running sequence: its KV cache holds `length` tokens; `last_token` is fed at the next decode."""

    request_id: str
    params: LogitsParams
    generator: torch.Generator | None
    length: int
    last_token: int
    generated: int


class Engine:
    """Owns the model and the running batch; applies `Step`s and returns their `StepResult`s.

    With world_size > 1 the caller must have joined torch.distributed's default
    group first; every rank then runs the same steps and samples the same tokens.
    """

    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self.device = resolve_device(config.device, config.rank)
        self.dtype = resolve_dtype(config.dtype_str, self.device)
        self.model_path = resolve_model_path(config.model_name, config.revision)
        model_config = json.loads((self.model_path / "config.json").read_text())
        self.max_sequence_length = config.max_sequence_length or model_max_length(model_config)
        self.max_new_tokens = min(config.max_new_tokens, self.max_sequence_length - 1)
        if self.max_new_tokens < config.max_new_tokens:
            logger.warning("max_new_tokens lowered from %d to %d to fit max_sequence_length %d",
                           config.max_new_tokens, self.max_new_tokens, self.max_sequence_length)
        self.eos_id = _first(model_config.get("eos_token_id"))
        if self.eos_id is None:
            self.eos_id = _tokenizer_eos(self.model_path)
        pad_id = _first(model_config.get("pad_token_id"))
        self.pad_id = self.eos_id if pad_id is None else pad_id

        logger.info("Loading %s from %s (%s on %s, rank %d of %d)", config.model_name, self.model_path,
                    str(self.dtype).removeprefix("torch."), self.device, config.rank, config.world_size)
        self.model = load_model(self.model_path, self.dtype, self.device, config.rank, config.world_size)
        args = self.model.args
        self.vocab_size = args.vocab_size
        self.cache = KVCache(args.num_layers, config.max_batch_size, args.num_kv_heads // config.world_size,
                             args.head_dim, self.max_sequence_length, self.dtype, self.device)
        # Which ids each slot's prompt and output hold, for the repetition penalty.
        self.seen = torch.zeros(config.max_batch_size, self.vocab_size, dtype=torch.bool, device=self.device)
        self.sequences: list[Sequence] = []
        self.max_prefill_tokens = config.max_prefill_tokens

    def model_info(self) -> ModelInfo:
        return ModelInfo(
            model_name=self.config.model_name, model_path=str(self.model_path), encoder_decoder=False,
            vocab_size=self.vocab_size, eos_token_id=self.eos_id, pad_token_id=self.pad_id,
            max_sequence_length=self.max_sequence_length, max_new_tokens=self.max_new_tokens,
            max_batch_size=self.config.max_batch_size, world_size=self.config.world_size,
            device=str(self.device), dtype=str(self.dtype).removeprefix("torch."),
        )

    @torch.inference_mode()
    def step(self, step: Step) -> StepResult:
        """Drop `step.remove`, prefill `step.add`, then decode one token for the sequences that were running."""
        for request_id in step.remove:
            self._remove(request_id)
        self._check_new(step.add)
        running = len(self.sequences)
        if step.decode and running:
            self._check_decode(running)
        started = time.perf_counter_ns()
        outputs = [output for chunk in self._prefill_chunks(step.add) for output in self._prefill(chunk)]
        if step.decode and running:
            outputs += self._decode(running)
        return StepResult(step_id=step.step_id, outputs=outputs, forward_ns=time.perf_counter_ns() - started)

    def reset(self) -> None:
        """Forget every sequence (after a failed step the batch state cannot be trusted)."""
        self.sequences.clear()

    def _check_new(self, new: list[NewSequence]) -> None:
        # Reject the whole step before touching any state, so a bad request cannot half-apply it.
        if len(self.sequences) + len(new) > self.config.max_batch_size:
            raise ValueError(f"batch full: {len(self.sequences)} running + {len(new)} new sequences "
                             f"> max_batch_size {self.config.max_batch_size}")
        known = {seq.request_id for seq in self.sequences}
        for seq in new:
            if seq.request_id in known:
                raise ValueError(f"sequence {seq.request_id} is already running")
            known.add(seq.request_id)
            if not 0 < len(seq.input_ids) < self.max_sequence_length:
                raise ValueError(f"sequence {seq.request_id} has {len(seq.input_ids)} input tokens; "
                                 f"must be between 1 and max_sequence_length - 1 ({self.max_sequence_length - 1})")
            if min(seq.input_ids) < 0 or max(seq.input_ids) >= self.vocab_size:
                raise ValueError(f"sequence {seq.request_id} has token ids outside the vocabulary")

    def _check_decode(self, running: int) -> None:
        for seq in self.sequences[:running]:
            if seq.length + 1 > self.max_sequence_length:
                raise ValueError(f"sequence {seq.request_id} reached max_sequence_length {self.max_sequence_length}")

    def _remove(self, request_id: str) -> None:
        slot = next((i for i, seq in enumerate(self.sequences) if seq.request_id == request_id), None)
        if slot is None:
            return
        last = len(self.sequences) - 1
        if slot != last:
            moved = self.sequences[last]
            self.cache.move(last, slot, moved.length)
            self.seen[slot] = self.seen[last]
            self.sequences[slot] = moved
        self.sequences.pop()

    def _prefill_chunks(self, new: list[NewSequence]) -> list[list[NewSequence]]:
        """`new` in order, cut into runs of at most max_prefill_tokens prompt tokens (a longer prompt runs alone)."""
        chunks: list[list[NewSequence]] = []
        size = 0
        for seq in new:
            if not chunks or size + len(seq.input_ids) > self.max_prefill_tokens:
                chunks.append([])
                size = 0
            chunks[-1].append(seq)
            size += len(seq.input_ids)
        return chunks

    def _prefill(self, new: list[NewSequence]) -> list[SequenceOutput]:
        """Prefill `new` into the next slots in one forward pass and choose each one's first token."""
        first, params = len(self.sequences), [seq.logits for seq in new]
        ids = [torch.frombuffer(token_ids(seq.input_ids), dtype=torch.int32).to(self.device, torch.long)
               for seq in new]
        self.cache.ensure_capacity(max(len(i) for i in ids))
        logits = self.model.prefill(ids, self.cache, first, [p.input_details for p in params])
        slots = torch.arange(first, first + len(new), device=self.device)
        lengths = torch.tensor([len(i) for i in ids], device=self.device)
        self.seen[slots] = False
        self.seen[slots.repeat_interleave(lengths), torch.cat(ids)] = True
        batch = BatchParams.build(params, self.device)
        generators = [make_generator(p, self.device) for p in params]
        generated = torch.zeros(len(new), dtype=torch.long, device=self.device)
        # Stacking copies the last rows, so processing them in place leaves the raw logits to input details.
        scores = process(torch.stack([rows[-1] for rows in logits]), batch, generated, self.seen[slots],
                         self.eos_id, self.pad_id)
        tokens = choose(scores, batch, generators)
        self.seen[slots, tokens] = True
        outputs = []
        for row, (seq, token) in enumerate(zip(new, tokens.tolist(), strict=True)):
            self.sequences.append(Sequence(seq.request_id, seq.logits, generators[row], len(ids[row]), token, 1))
            details = input_details(seq.logits, logits[row], ids[row]) if seq.logits.input_details else None
            outputs.append(SequenceOutput(seq.request_id, token_detail(seq.logits, scores[row], token), details))
        return outputs

    def _decode(self, running: int) -> list[SequenceOutput]:
        seqs = self.sequences[:running]
        last_tokens = torch.tensor([seq.last_token for seq in seqs], device=self.device)
        lengths = torch.tensor([seq.length for seq in seqs], device=self.device)
        self.cache.ensure_capacity(max(seq.length for seq in seqs) + 1)
        logits = self.model.decode(last_tokens, lengths, self.cache)
        batch = BatchParams.build([seq.params for seq in seqs], self.device)
        generated = torch.tensor([seq.generated for seq in seqs], device=self.device)
        scores = process(logits, batch, generated, self.seen[:running], self.eos_id, self.pad_id)
        tokens = choose(scores, batch, [seq.generator for seq in seqs])
        self.seen[torch.arange(running, device=self.device), tokens] = True
        outputs = []
        for row, (seq, token) in enumerate(zip(seqs, tokens.tolist(), strict=True)):
            seq.length, seq.last_token, seq.generated = seq.length + 1, token, seq.generated + 1
            outputs.append(SequenceOutput(seq.request_id, token_detail(seq.params, scores[row], token)))
        return outputs


def _tokenizer_eos(model_path: Path) -> int:
    from transformers import AutoTokenizer

    eos = AutoTokenizer.from_pretrained(model_path).eos_token_id
    if eos is None:
        raise ValueError(f"no eos_token_id in {model_path}/config.json nor in its tokenizer")
    return eos
