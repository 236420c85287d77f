"""The fmaas GenerationService: Generate, GenerateStream, Tokenize and ModelInfo, with TGIS semantics."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable

import grpc
from msgspec.structs import replace

from services.common.protocol import DetokParams, GenerateRequest, StopReason
from services.gateway.adapters import AdapterLookup
from services.gateway.generation import FailedEvent, Generation, InputTokensEvent, TokenEvent
from services.gateway.guided import check_guide
from services.gateway.metrics import GatewayMetrics
from services.gateway.pb import generation_pb2 as pb
from services.gateway.pb import generation_pb2_grpc
from services.gateway.prefixes import PrefixLookup
from services.gateway.scheduler_client import SchedulerClient
from services.gateway.tokenizer_pool import TokenizerFailed, TokenizerPool, TokenizerUnavailable
from services.gateway.validation import (
    Limits,
    ValidatedInput,
    ValidatedParams,
    ValidationError,
    check_input,
    convert_and_validate,
    with_prefix_placeholders,
)

log = logging.getLogger(__name__)

# gRPC's send limit; a request whose reply could not fit is refused before any work.
MAX_SEND_MESSAGE_BYTES = 64 * 1024 * 1024
SCHEDULER_UNAVAILABLE = "Scheduler unavailable: not answering, try again later"


class ConcurrencyLimiter:
    """TGIS's permits: one per input, taken without waiting."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.in_use = 0

    def try_acquire(self, n: int) -> bool:
        if self.in_use + n > self.capacity:
            return False
        self.in_use += n
        return True

    def release(self, n: int) -> None:
        self.in_use -= n


class GenerationFailed(Exception):
    """Generation of an input failed after it was accepted."""


class GenerationServicer(generation_pb2_grpc.GenerationServiceServicer):
    """Validates calls, sends inputs down the pipeline and assembles TGIS responses."""

    def __init__(self, scheduler: SchedulerClient, pool: TokenizerPool, metrics: GatewayMetrics, *,
                 max_concurrent_requests: int, default_include_stop_seqs: bool, output_special_tokens: bool,
                 prefixes: PrefixLookup | None = None, adapters: AdapterLookup | None = None) -> None:
        self.scheduler = scheduler
        self.pool = pool
        self.metrics = metrics
        self.prefixes = prefixes or PrefixLookup(metrics)
        self.adapters = adapters or AdapterLookup(None)
        self.limiter = ConcurrencyLimiter(max_concurrent_requests)
        self.default_include_stop_seqs = default_include_stop_seqs
        self.output_special_tokens = output_special_tokens
        self.draining = False
        self._special_prefix: tuple[int, ...] | None = None
        self._ids = itertools.count()
        # Told of every generation's outcome (the health checker listens).
        self.on_generation_result: Callable[[bool], None] = lambda ok: None

    @property
    def model(self):
        assert self.scheduler.info is not None
        return self.scheduler.info.model

    @property
    def limits(self) -> Limits:
        return Limits(self.model.max_sequence_length, self.model.max_new_tokens, self.default_include_stop_seqs,
                      self._special_prefix or (), self.model.vocab_size, MAX_SEND_MESSAGE_BYTES)

    async def _learn_special_prefix(self) -> None:
        """Which special ids the tokenizer puts before every text (e.g. a BOS), asked once."""
        if self._special_prefix is None:
            empty, text = await self.pool.tokenize(["", "a"])
            prefix = []
            for a, b in zip(empty.ids, text.ids, strict=False):
                if a != b:
                    break
                prefix.append(a)
            self._special_prefix = tuple(prefix)

    # ------------------------------------------------------------------ shared steps

    async def _refuse_if_unavailable(self, context: grpc.aio.ServicerContext) -> None:
        if self.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "Server is shutting down")
        if not await self.scheduler.answers():
            # Fail now rather than queue behind a scheduler that may never answer.
            await context.abort(grpc.StatusCode.UNAVAILABLE, SCHEDULER_UNAVAILABLE)

    async def _validate(self, texts: list[str], params_pb, prefix_id: str | None, received_at: float,
                        context, adapter_id: str | None = None) -> tuple[ValidatedParams, list[ValidatedInput]]:
        started = time.monotonic()
        try:
            if adapter_id:  # first, as the vLLM TGIS adapter checks it before the parameters
                await self.adapters.check(adapter_id, self.model)
            params = convert_and_validate(params_pb, self.limits, received_at)
            params.adapter_id = adapter_id or ""
            if params.logits.guide_kind:  # parsing a schema or grammar may take milliseconds: off the event loop
                if (error := await asyncio.to_thread(check_guide, params.logits.guide_kind, params.logits.guide)):
                    raise ValidationError(error)
            prefix_length = 0
            if prefix_id:
                prefix_length = await self.prefixes.length(prefix_id)
                params.prefix_id = prefix_id
            try:
                await self._learn_special_prefix()
                encoded = await self.pool.tokenize(texts)
            except TokenizerFailed as exc:
                raise ValidationError(f"tokenizer error {exc}") from exc
            inputs = []
            for tokenized in encoded:
                self.metrics.raw_input_length.observe(len(tokenized.ids))
                inputs.append(check_input(tokenized.ids, params, self.limits, prefix_length))
        except ValidationError as exc:
            self.metrics.request_failure.labels("validation").inc()
            log.info("refused a request: %s%s", exc,
                     f" x-correlation-id={cid}" if (cid := _correlation_id(context)) else "")
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except TokenizerUnavailable as exc:
            self.metrics.request_failure.labels("unknown").inc()
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        for validated in inputs:
            self.metrics.input_length.observe(validated.input_length)
            self.metrics.max_new_tokens.observe(params.max_new_tokens)
        self.metrics.validation_duration.observe(time.monotonic() - started)
        return params, inputs

    async def _start(self, params: ValidatedParams, inputs: list[ValidatedInput], received_at: float,
                     stream: bool, context) -> list[Generation]:
        """Open a detokenizer for each input and queue them all as one submission."""
        generations, requests = [], []
        correlation_id = _correlation_id(context)
        try:
            for validated in inputs:
                request_id = f"{self.scheduler.gateway_id}-{next(self._ids)}"
                logits = replace(params.logits, seed=validated.seed)
                generation = Generation(request_id, params, validated, correlation_id=correlation_id)
                detok = DetokParams(
                    params.stop_sequences, params.include_stop_sequence, not self.output_special_tokens,
                    self.model.eos_token_id, params.min_new_tokens, stream,
                )
                await self.pool.open_session(request_id, detok, self._delta_handler(generation))
                generations.append(generation)
                requests.append(GenerateRequest(
                    request_id, with_prefix_placeholders(validated, self.model.pad_token_id), logits, validated.stop,
                    received_at, params.prefix_id, validated.prefix_length, params.adapter_id))
        except BaseException:  # cancelled while waiting for a tokenizer: close what was opened
            for generation in generations:
                self.pool.close(generation.request_id)
            raise
        self.scheduler.submit(generations, requests)
        if params.adapter_id:
            self.metrics.lora_requests.labels(params.adapter_id).inc(len(requests))
        return generations

    def _delta_handler(self, generation: Generation):
        def on_delta(delta) -> None:
            generation.on_delta(delta)
            if generation.finished:
                if delta.stop_reason in (StopReason.STOP_SEQUENCE, StopReason.ERROR):
                    self.scheduler.cancel([generation.request_id])
                self.scheduler.finish(generation)
        return on_delta

    def _abandon(self, generations: list[Generation]) -> None:
        unfinished = [g.request_id for g in generations if not g.finished]
        if unfinished:
            self.scheduler.cancel(unfinished)

    def _count_cancelled(self, inputs: int, generations: list[Generation]) -> None:
        """The client went away: each of its inputs not finished counts once, whatever stage it had reached."""
        unfinished = inputs - sum(g.finished for g in generations)
        if unfinished > 0:
            self.metrics.request_failure.labels("cancelled").inc(unfinished)

    def _record_success(self, generation: Generation, event: TokenEvent, kind: str, received_at: float) -> None:
        # End to end from the call's arrival (wall clock `received_at`), as TGIS's start_time.
        total = max(0.0, time.time() - received_at)
        self.metrics.record_success(generation, event.count, str(event.stop_reason), kind, total)
        log.info("%s (%s) finished: %s, %d input + %d generated tokens, %.3f s (queued %.3f s)%s",
                 generation.request_id, kind, event.stop_reason, generation.input.input_length, event.count, total,
                 generation.queue_duration,
                 f" x-correlation-id={generation.correlation_id}" if generation.correlation_id else "")

    # ------------------------------------------------------------------ RPCs

    async def Generate(self, request: pb.BatchedGenerationRequest, context) -> pb.BatchedGenerationResponse:
        received_at = time.time()
        n = len(request.requests)
        self.metrics.request_count.labels("single" if n == 1 else "batch").inc()
        if n == 0:
            return pb.BatchedGenerationResponse()
        await self._refuse_if_unavailable(context)
        self.metrics.request_input_count.inc(n)
        if not self.limiter.try_acquire(n):
            self.metrics.request_failure.labels("conc_limit").inc()
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "Model is overloaded")
        try:
            return await self.generate_unlimited(request, context, received_at)
        finally:
            self.limiter.release(n)

    async def generate_unlimited(self, request: pb.BatchedGenerationRequest, context,
                                 received_at: float | None = None) -> pb.BatchedGenerationResponse:
        """Generate without taking permits (the health probe's path; Generate takes them first)."""
        received_at = time.time() if received_at is None else received_at
        kind = "single" if len(request.requests) == 1 else "batch"
        generations: list[Generation] = []
        try:
            prefix_id = request.prefix_id if request.HasField("prefix_id") else None
            params, inputs = await self._validate([r.text for r in request.requests], request.params, prefix_id,
                                                  received_at, context, request.adapter_id)
            generations = await self._start(params, inputs, received_at, stream=False, context=context)
            try:
                results = await asyncio.gather(*(self._collect(g, kind, received_at) for g in generations))
            except GenerationFailed as exc:
                self.metrics.request_failure.labels("generate").inc()
                self.on_generation_result(False)
                await context.abort(grpc.StatusCode.UNKNOWN, f"Request failed during generation: {exc}")
            self.on_generation_result(True)
            responses = [
                self._unary_response(g, text, r.text, final, tokens, input_tokens)
                for g, r, (text, final, tokens, input_tokens) in zip(generations, request.requests, results, strict=True)
            ]
            return pb.BatchedGenerationResponse(responses=responses)
        except asyncio.CancelledError:
            self._count_cancelled(len(request.requests), generations)
            raise
        finally:
            self._abandon(generations)

    async def _collect(self, generation: Generation, kind: str, received_at: float):
        texts, tokens, input_tokens = [], [], []
        while True:
            event = await generation.events.get()
            if isinstance(event, FailedEvent):
                raise GenerationFailed(event.message)
            if isinstance(event, InputTokensEvent):
                input_tokens = event.tokens
                continue
            texts.append(event.text)
            if event.token is not None:
                tokens.append(event.token)
            if event.stop_reason != StopReason.NOT_FINISHED:
                self._record_success(generation, event, kind, received_at)
                return "".join(texts), event, tokens, input_tokens

    def _unary_response(self, generation: Generation, text: str, input_text: str, final: TokenEvent,
                        tokens, input_tokens) -> pb.GenerationResponse:
        params = generation.params
        # A request that timed out in the queue answers with empty text even when input_text was asked for.
        if params.input_text and final.count > 0:
            # TGIS separates an encoder-decoder model's input from its output (unary calls only).
            text = input_text + ("\n\n" if self.model.encoder_decoder else "") + text
        return pb.GenerationResponse(
            input_token_count=generation.input.input_length, generated_token_count=final.count, text=text,
            stop_reason=int(final.stop_reason), stop_sequence=final.stop_sequence, seed=generation.input.seed,
            tokens=tokens, input_tokens=input_tokens,
        )

    async def GenerateStream(self, request: pb.SingleGenerationRequest, context):
        received_at = time.time()
        self.metrics.request_count.labels("stream").inc()
        await self._refuse_if_unavailable(context)
        self.metrics.request_input_count.inc()
        if not self.limiter.try_acquire(1):
            self.metrics.request_failure.labels("conc_limit").inc()
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "Model is overloaded")
        generations: list[Generation] = []
        try:
            if not request.HasField("request"):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "missing request")
            prefix_id = request.prefix_id if request.HasField("prefix_id") else None
            params, inputs = await self._validate([request.request.text], request.params, prefix_id, received_at,
                                                  context, request.adapter_id)
            first = pb.GenerationResponse(input_token_count=inputs[0].input_length, seed=inputs[0].seed)
            if params.input_text:
                first.text = request.request.text
            yield first
            generations = await self._start(params, inputs, received_at, stream=True, context=context)
            generation = generations[0]
            while True:
                event = await generation.events.get()
                if isinstance(event, FailedEvent):
                    self.metrics.request_failure.labels("generate").inc()
                    self.on_generation_result(False)
                    await context.abort(grpc.StatusCode.UNKNOWN, f"Request failed during generation: {event.message}")
                if isinstance(event, InputTokensEvent):
                    yield pb.GenerationResponse(input_token_count=len(event.tokens), input_tokens=event.tokens)
                    continue
                final = event.stop_reason != StopReason.NOT_FINISHED
                if not final and not event.text and event.token is None:
                    continue  # TGIS sends no message that carries nothing
                message = pb.GenerationResponse(generated_token_count=event.count, text=event.text)
                if event.token is not None:
                    message.tokens.append(event.token)
                if final:
                    self.on_generation_result(True)
                    message.stop_reason = int(event.stop_reason)
                    message.stop_sequence = event.stop_sequence
                    message.seed = generation.input.seed
                    self._record_success(generation, event, "stream", received_at)
                yield message
                if final:
                    return
        except (asyncio.CancelledError, GeneratorExit):  # GeneratorExit: closed while waiting to send a message
            self._count_cancelled(1, generations)
            raise
        finally:
            self._abandon(generations)
            self.limiter.release(1)

    async def Tokenize(self, request: pb.BatchedTokenizeRequest, context) -> pb.BatchedTokenizeResponse:
        started = time.monotonic()
        self.metrics.tokenize_request_count.inc()
        self.metrics.tokenize_request_input_count.inc(len(request.requests))
        if not request.requests:
            return pb.BatchedTokenizeResponse()
        # The ids are checked as the vLLM TGIS adapter does; tokenization does not change with them (the adapter
        # uses the base tokenizer too), and a prompt prefix is not part of input_token_count.
        try:
            await self._check_tokenize_ids(request)
        except ValidationError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        try:
            encoded = await self.pool.tokenize([r.text for r in request.requests], request.return_tokens,
                                               request.return_offsets)
        except TokenizerFailed as exc:
            await context.abort(grpc.StatusCode.UNKNOWN, f"tokenizer error {exc}")
        except TokenizerUnavailable as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        truncate = request.truncate_input_tokens
        responses, total = [], 0
        for tokenized in encoded:
            keep = min(len(tokenized.ids), truncate) if truncate > 0 else len(tokenized.ids)
            response = pb.TokenizeResponse(token_count=keep)
            if request.return_tokens:
                response.tokens.extend(tokenized.tokens[len(tokenized.tokens) - keep:])
            if request.return_offsets:
                for start, end in tokenized.offsets[len(tokenized.offsets) - keep:]:
                    response.offsets.add(start=start, end=end)
            total += keep
            responses.append(response)
        self.metrics.tokenize_tokens.observe(total)
        self.metrics.tokenize_duration.observe(time.monotonic() - started)
        return pb.BatchedTokenizeResponse(responses=responses)

    async def _check_tokenize_ids(self, request: pb.BatchedTokenizeRequest) -> None:
        """adapter_id must name a servable LoRA adapter; so must prefix_id when adapter_id is unset, as the adapter
        reads it, unless it names one of our prompt prefixes (then a failure is told in TGIS's prefix words)."""
        if request.adapter_id:
            await self.adapters.check(request.adapter_id, self.model)
        elif request.prefix_id:
            try:
                await self.adapters.check(request.prefix_id, self.model)
            except ValidationError:
                if self.prefixes.store is None:
                    raise
                await self.prefixes.length(request.prefix_id)

    async def ModelInfo(self, request: pb.ModelInfoRequest, context) -> pb.ModelInfoResponse:
        model = self.model
        kind = pb.ModelInfoResponse.ENCODER_DECODER if model.encoder_decoder else pb.ModelInfoResponse.DECODER_ONLY
        return pb.ModelInfoResponse(model_kind=kind, max_sequence_length=model.max_sequence_length,
                                    max_new_tokens=model.max_new_tokens)


def _correlation_id(context) -> str:
    """The caller's x-correlation-id metadata (logged, as TGIS does; otherwise unused)."""
    metadata = getattr(context, "invocation_metadata", lambda: None)() or ()
    return next((value for key, value in metadata if key == "x-correlation-id"), "")

