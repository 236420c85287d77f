"""The worker's engine: the model, its paged KV cache and the sequences' sampling state; one `Step` at a time.

No sockets here: `main.py` feeds it steps.  The scheduler decides which
tokens of which sequences run and in which KV blocks; the engine runs them all
in one forward pass (decodes first, then prefill chunks), chooses a token for
every chunk that reaches its sequence's last known token, in one vectorized
call, and keeps each sequence's tokens, RNG and repetition-penalty state.  A
sequence or chunk that cannot run (bad ids, lengths, block tables) fails
alone and is reported in `StepResult.failed`; the rest of the step runs.
"""

from __future__ import annotations

import json
import logging
import time

import torch

from services.common.lora_adapters import AdapterError
from services.common.model_path import resolve_model_path
from services.common.protocol import (
    ModelInfo,
    NewSequence,
    ScheduledChunk,
    SequenceOutput,
    Step,
    StepResult,
)
from services.worker import cpu_attention
from services.worker.checkpoint import load_model
from services.worker.compile import compile_model, pt2_compile_enabled, warm_up
from services.worker.config import WorkerConfig
from services.worker.guided import Guides, allow_eos_where_stuck, mask_guided
from services.worker.kv_cache import PagedKVCache, budget_bytes
from services.worker.lora import LoraWeights, open_loras
from services.worker.lora_layers import LoraBatch, lora_context
from services.worker.model_config import model_max_length, resolve_device, resolve_dtype, special_token_ids
from services.worker.packed_linear import pack_linear_layers, packed_linears_supported
from services.worker.paged_attention import PagedBatch, forward_context
from services.worker.prefixes import covers_prefix, embed_with_prefixes, load_prefix, open_store
from services.worker.sampling import (
    BatchParams,
    argmax,
    choose,
    input_details,
    is_plain_greedy,
    make_generator,
    process,
    token_detail,
)
from services.worker.seq2seq import run_encoder_decoder
from services.worker.sequence import Planned, Sequence, StepError

logger = logging.getLogger(__name__)

WARM_UP_PREFILL = 512  # tokens of the prefill chunk in the PT2 warm-up (any length > 1 shares its compiled graph)


class Engine:
    """Owns the model, the KV pool and the sequences; applies `Step`s and returns their `StepResult`s.

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
        self.eos_id, self.pad_id = special_token_ids(model_config, self.model_path)

        logger.info("Loading %s from %s (%s on %s, rank %d of %d)", config.model_name, self.model_path,
                    str(self.dtype).removeprefix("torch."), self.device, config.rank, config.world_size)
        # Decided before loading: a compiled model's linear layers are packed inside its graph, not at load.
        compiled = pt2_compile_enabled(config.pt2_compile) and not model_config.get("is_encoder_decoder", False)
        self.model = load_model(self.model_path, self.dtype, self.device, config.rank, config.world_size,
                                quantize=config.quantize, group_size=config.quantize_group_size,
                                framework=config.deployment_framework, pack_linears=not compiled,
                                float32_prepack=config.float32_prepack)
        args = self.model.args
        positions = getattr(self.model, "max_positions", None)
        if positions is not None and self.max_sequence_length > positions:
            raise ValueError(f"max_sequence_length {self.max_sequence_length} exceeds the {positions} positions of "
                             f"{model_config.get('model_type')}'s learned position embeddings")
        self.vocab_size = args.vocab_size
        native_attention = cpu_attention.enable(config.native_kernels and self.device.type == "cpu")
        logger.info("Decode attention: %s", "native CPU kernel" if native_attention else "torch ops")
        budget = budget_bytes(config.kv_cache_memory, self.device)
        if getattr(self.model, "encoder_decoder", False) and getattr(self.model, "paged", True):
            # T5 keeps each sequence's cross-attention K/V beside the pool: encoder length x the pool's per-token size,
            # and a sequence's blocks cover its encoder length, so half the budget each keeps both inside it.
            budget //= 2
        self.cache = PagedKVCache.for_budget(
            budget, self.max_sequence_length, args.num_layers,
            config.kv_block_size, self.model.kv_heads_per_rank, args.head_dim, self.dtype,
            # A model on its own cache (hf_transformers encoder-decoders) leaves the pool unused: no memory for it.
            self.device if getattr(self.model, "paged", True) else torch.device("meta"))
        self.sequences: dict[str, Sequence] = {}
        self.guides = Guides(self.model_path, self.vocab_size, self.eos_id, config.guided_decoding_cache_size)
        self._guide_failures: dict[str, str] = {}  # sequences whose constraint failed to compile, this step
        self.encoder_decoder = getattr(self.model, "encoder_decoder", False)
        self.prefixes = open_store(config.prefix_store_path, config.prompt_cache_size_mb,
                                   config.max_prompt_prefix_length, args.hidden_size, self.dtype,
                                   self.max_sequence_length, self.encoder_decoder)
        # After quantization, before compiling: LoRA wraps the (possibly quantized) linear layers.
        self.loras = open_loras(config.adapter_cache, config.max_loras, self.model, self.model_path, self.dtype,
                                self.device, config.rank, config.world_size)
        # Steps with LoRA rows run this eager forward: the compiled graph is traced without LoRA (compile.py).
        self.eager_forward = self.model.forward
        if pt2_compile_enabled(config.pt2_compile) and not compiled:
            logger.warning("PT2_COMPILE is not applied to encoder-decoder models: they run eagerly")
        elif compiled:
            # Frozen bfloat16 weights: inductor packs them for oneDNN (float32 ones it would hand to MKL's packed sgemm).
            compile_model(self.model, freeze=self.dtype == torch.bfloat16
                          and packed_linears_supported(self.dtype, self.device))
            # The output layer runs outside the compiled forward (`logits`): packed as in an eager model.
            pack_linear_layers(self.model, self.dtype, self.device, names={"lm_head"}, float32=config.float32_prepack)
            warm_up(self.model, self.cache, config.max_batch_size, min(WARM_UP_PREFILL, self.max_sequence_length - 1))

    def model_info(self) -> ModelInfo:
        return ModelInfo(
            model_name=self.config.model_name, model_path=str(self.model_path), encoder_decoder=self.encoder_decoder,
            vocab_size=self.vocab_size, eos_token_id=self.eos_id, pad_token_id=self.pad_id,
            max_sequence_length=self.max_sequence_length, max_new_tokens=self.max_new_tokens,
            max_batch_size=self.config.max_batch_size, world_size=self.config.world_size,
            device=str(self.device), dtype=str(self.dtype).removeprefix("torch."),
            hidden_size=self.model.args.hidden_size,
            max_loras=self.config.max_loras if self.config.adapter_cache else 0,
            lora_modules=self.loras.plan.leaf_shapes if self.loras else {},
        )

    @torch.inference_mode()
    def step(self, step: Step) -> StepResult:
        """Forget `step.remove`, register `step.add`, run `step.run` in one forward pass."""
        for request_id in step.remove:
            self.sequences.pop(request_id, None)
        failed: dict[str, str] = {}
        for new in step.add:
            try:
                self._add(new)
            except StepError as exc:
                failed[new.request_id] = str(exc)
        planned = []
        for chunk in step.run:
            if chunk.request_id in failed:
                continue
            try:
                planned.append(Planned(self._check_chunk(chunk), chunk))
            except StepError as exc:
                failed[chunk.request_id] = str(exc)
                self.sequences.pop(chunk.request_id, None)
        started = time.perf_counter_ns()
        outputs = self._run(planned) if planned else []
        failed.update(self._guide_failures)
        self._guide_failures.clear()
        return StepResult(step_id=step.step_id, outputs=outputs, forward_ns=time.perf_counter_ns() - started,
                          failed=failed)

    def reset(self) -> None:
        """Forget every sequence (after a failed step the state cannot be trusted)."""
        self.sequences.clear()

    # ------------------------------------------------------------------ validation

    def _add(self, new: NewSequence) -> None:
        ids = list(new.input_ids)
        if new.request_id in self.sequences:
            raise StepError(f"sequence {new.request_id} is already running")
        if not 0 < len(ids) < self.max_sequence_length:
            raise StepError(f"{len(ids)} input tokens; must be between 1 and max_sequence_length - 1 "
                            f"({self.max_sequence_length - 1})")
        if min(ids) < 0 or max(ids) >= self.vocab_size:
            raise StepError(f"token ids outside the vocabulary (0..{self.vocab_size - 1})")
        prefix = None
        if new.prefix_id:
            try:
                prefix = load_prefix(self.prefixes, new.prefix_id, new.prefix_length, self.device)
            except LookupError as exc:
                raise StepError(str(exc)) from exc
        lora = self._lora(new.adapter_id) if new.adapter_id else None
        seen = None
        if new.logits.repetition_penalty != 1.0:
            seen = torch.zeros(self.vocab_size, dtype=torch.bool, device=self.device)
            # Seq2seq: decoder ids only (the decoder start token), not the encoder input.
            history = [self.model.args.decoder_start_token_id] if self.encoder_decoder else ids
            seen[torch.tensor(history, device=self.device)] = True
        self.sequences[new.request_id] = Sequence(new.request_id, new.logits, make_generator(new.logits, self.device),
                                                  ids, len(ids), seen=seen, prefix=prefix,
                                                  guide=self.guides.start(new.logits), lora=lora)

    def _lora(self, adapter_id: str) -> LoraWeights:
        if self.loras is None:
            raise StepError(f"can't load adapter with id '{adapter_id}': LoRA adapters are off on this worker")
        in_use = {seq.lora.adapter_id for seq in self.sequences.values() if seq.lora is not None}
        try:
            return self.loras.get(adapter_id, in_use)
        except AdapterError as exc:
            raise StepError(str(exc)) from exc

    def _check_chunk(self, chunk: ScheduledChunk) -> Sequence:
        seq = self.sequences.get(chunk.request_id)
        if seq is None:
            raise StepError(f"sequence {chunk.request_id} is not known to the worker")
        end = chunk.start + chunk.count
        if chunk.count < 1 or chunk.start < 0 or end > len(seq.tokens):
            raise StepError(f"chunk [{chunk.start}, {end}) outside the sequence's {len(seq.tokens)} tokens")
        if chunk.start > seq.computed and seq.computed > 0:
            raise StepError(f"chunk starts at {chunk.start} but only {seq.computed} tokens are computed")
        if end > self.max_sequence_length:
            raise StepError(f"sequence reached max_sequence_length {self.max_sequence_length}")
        table, block_size = chunk.block_table, self.cache.block_size
        if len(table) * block_size < end or min(table) < 0 or max(table) >= self.cache.num_blocks:
            raise StepError(f"block table of {len(table)} blocks does not cover {end} positions "
                            f"in a pool of {self.cache.num_blocks}")
        if seq.params.input_details and not seq.details_sent and end == len(seq.tokens) and chunk.start != 0:
            raise StepError("input token details need the whole prompt in one chunk")
        return seq

    # ------------------------------------------------------------------ forward and sampling

    def _run(self, planned: list[Planned]) -> list[SequenceOutput]:
        if self.encoder_decoder:
            return run_encoder_decoder(self, planned)
        # Decodes (one token after position 0) first: they attend in one batched call.
        planned.sort(key=lambda p: not (p.chunk.count == 1 and p.chunk.start > 0))
        ids, positions = [], []
        for p in planned:
            ids.extend(p.sequence.tokens[p.chunk.start: p.chunk.start + p.chunk.count])
            positions.extend(range(p.chunk.start, p.chunk.start + p.chunk.count))
        batch = PagedBatch.build(self.cache.block_size, [list(p.chunk.block_table) for p in planned],
                                 [p.chunk.start for p in planned], [p.chunk.count for p in planned], self.device)
        ids_t, positions_t = torch.tensor(ids, device=self.device), torch.tensor(positions, device=self.device)
        runs = [(p.sequence.prefix and p.sequence.prefix.decoder, p.chunk.start, p.chunk.count) for p in planned]
        lora = LoraBatch.build([(p.sequence.lora, p.chunk.count) for p in planned], self.device)
        with forward_context(batch, self.cache), lora_context(lora):
            if covers_prefix(runs):  # prompt prefix rows: from embeddings (the compiled forward takes ids only)
                hidden = self.model.forward_embeds(embed_with_prefixes(self.model, ids_t, runs), positions_t)
            elif lora is not None:
                hidden = self.eager_forward(ids_t, positions_t)
            else:
                hidden = self.model(ids_t, positions_t)
        # Logits only where needed: the last token of each sampling chunk, every token of one wanting input details.
        rows, row, sampling = [], 0, []
        for p in planned:
            if p.samples:
                first = len(rows)
                rows.extend(range(row, row + p.chunk.count) if p.wants_input_details else [row + p.chunk.count - 1])
                sampling.append((p, first, len(rows) - 1))
            row += p.chunk.count
            p.sequence.computed = p.chunk.start + p.chunk.count
        if not sampling:
            return []
        # index_select, not hidden[rows]: advanced indexing costs a millisecond or more per call on CPU.
        logits = self.model.logits(hidden.index_select(0, torch.tensor(rows, device=self.device)))
        return self._sample(sampling, logits)

    def _sample(self, sampling: list[tuple[Planned, int, int]], logits: torch.Tensor) -> list[SequenceOutput]:
        seqs = [p.sequence for p, _, _ in sampling]
        params = [seq.params for seq in seqs]
        last = torch.tensor([last for _, _, last in sampling], device=self.device)
        # Indexing copies the rows, so processing them in place leaves the raw logits to input details.
        scores = logits.index_select(0, last)
        guided = mask_guided(self.guides, seqs, scores, self._guide_failures)
        if all(is_plain_greedy(p) for p in params):  # nothing to process: the argmax is the token
            tokens = argmax(scores)
        else:
            batch = BatchParams.build(params, self.device)
            generated = torch.tensor([seq.generated for seq in seqs], device=self.device)
            seen = None
            if batch.any(lambda p: p.repetition_penalty != 1.0):
                no_ids = torch.zeros(self.vocab_size, dtype=torch.bool, device=self.device)
                seen = torch.stack([no_ids if seq.seen is None else seq.seen for seq in seqs])
            scores = process(scores, batch, generated, seen, self.eos_id, self.pad_id)
            if guided:
                allow_eos_where_stuck(scores, guided, self.eos_id)
            tokens = choose(scores, batch, [seq.generator for seq in seqs])
        outputs = []
        for i, ((p, first, last_row), token) in enumerate(zip(sampling, tokens.tolist(), strict=True)):
            seq = p.sequence
            if seq.request_id in self._guide_failures:
                self.sequences.pop(seq.request_id, None)
                continue
            details = None
            if p.wants_input_details:
                prompt = torch.tensor(seq.tokens[: seq.prompt_length], device=self.device)
                details = input_details(seq.params, logits[first: last_row + 1], prompt)
                seq.details_sent = True
            seq.tokens.append(token)
            seq.generated += 1
            if seq.guide is not None:
                seq.guide.accept(token)
            if seq.seen is not None:
                seq.seen[token] = True
            outputs.append(SequenceOutput(seq.request_id, token_detail(seq.params, scores[i], token), details))
        return outputs

