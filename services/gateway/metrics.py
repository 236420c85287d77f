"""The tgi_* Prometheus metrics (TGIS names, kinds, labels and buckets), recorded by the gateway.

Steps run in the scheduler and worker; their figures arrive in `StepStats`
attached to token batches, so one scrape of the gateway shows the whole
pipeline (see docs/architecture.md).

Exposition follows TGIS's (metrics-exporter-prometheus): every counter is
emitted twice, as `name` and as `name_total`, with the same labels and value,
and there are no `_created` series.  `render()` writes that text format from
the prometheus_client registry.

Two histograms have no buckets in TGIS (its exporter then probably renders a
summary; the spec marks this UNCLEAR).  Here they are histograms:
`tgi_request_raw_input_length` uses the `tgi_request_input_length` buckets
(max_sequence_length/64 * i) so both can be compared, and
`tgi_batch_next_tokens` (total input tokens of a prefill step) uses powers of
two up to max_sequence_length * max_batch_size.
"""

from __future__ import annotations

import math
import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.utils import floatToGoString

from services.common.protocol import StepStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

DURATION_BUCKETS = [0.0001 * 1.5**k for k in range(1, 36)]
TOKENIZE_TOKEN_BUCKETS = [float(2**k) for k in range(6, 20)]

# Messages of the scheduler's RequestFailed that are not a failed forward pass.
NOT_A_STEP_FAILURE = ("model not loaded", "no model worker is ready")


def _linear(limit: int) -> list[float]:
    return [limit / 64 * i for i in range(1, 65)]


def _powers_of_two(limit: int) -> list[float]:
    top = max(1, math.ceil(math.log2(max(limit, 1))))
    return [float(2**k) for k in range(0, top + 1)]


def failure_reason(message: str) -> str:
    """TGIS's `reason` label of tgi_batch_inference_failure for a step failure message."""
    if message == "GPU out of memory":
        return "oom"
    if "stopped responding" in message or "lost connection" in message:
        return "connection"
    return "error"


class GatewayMetrics:
    """Every tgi_* metric in one registry; built once the model's limits are known."""

    def __init__(self, max_sequence_length: int, max_new_tokens: int, max_batch_size: int) -> None:
        self.registry = r = CollectorRegistry()
        self.request_count = Counter("tgi_request_count", "gRPC generate calls", ["kind"], registry=r)
        self.request_input_count = Counter("tgi_request_input_count", "inputs received by Generate/GenerateStream",
                                           registry=r)
        self.request_failure = Counter("tgi_request_failure", "failed calls or inputs, by error", ["err"], registry=r)
        self.request_success = Counter("tgi_request_success", "finished inputs", ["stop_reason", "kind"], registry=r)
        self.batch_concatenation = Counter("tgi_batch_concatenation_count", "add-on batches merged", registry=r)
        self.batch_inference_count = Counter("tgi_batch_inference_count", "worker steps", ["method"], registry=r)
        self.batch_inference_success = Counter("tgi_batch_inference_success", "successful steps", ["method"], registry=r)
        self.batch_inference_failure = Counter(
            "tgi_batch_inference_failure", "failed steps", ["method", "reason"], registry=r)
        self.queue_jump = Counter("tgi_queue_jump", "entries that jumped the queue", registry=r)
        self.granular_batch_addition = Counter("tgi_granular_batch_addition", "granular weight checks that fit", registry=r)
        self.prefill_weight_limit_exceeded = Counter(
            "tgi_prefill_weight_limit_exceeded", "entries skipped for prefill weight", registry=r)
        self.prefill_padding_limit_exceeded = Counter(
            "tgi_prefill_padding_limit_exceeded", "entries skipped for prefill padding", registry=r)
        self.prompt_load_failure = Counter("tgi_prompt_load_failure", "failed prompt prefix loads", registry=r)
        self.tokenize_request_count = Counter("tgi_tokenize_request_count", "Tokenize calls", registry=r)
        self.tokenize_request_input_count = Counter("tgi_tokenize_request_input_count", "Tokenize inputs", registry=r)

        def hist(name: str, doc: str, buckets: list[float], labels: tuple[str, ...] = ()) -> Histogram:
            return Histogram(name, doc, list(labels), buckets=buckets, registry=r)

        self.raw_input_length = hist("tgi_request_raw_input_length", "input tokens before truncation",
                                     _linear(max_sequence_length))
        self.input_length = hist("tgi_request_input_length", "input tokens", _linear(max_sequence_length))
        self.max_new_tokens = hist("tgi_request_max_new_tokens", "requested max_new_tokens", _linear(max_new_tokens))
        self.validation_duration = hist("tgi_request_validation_duration", "validation seconds", DURATION_BUCKETS)
        self.queue_duration = hist("tgi_request_queue_duration", "seconds queued", DURATION_BUCKETS)
        self.inference_duration = hist("tgi_request_inference_duration", "seconds generating", DURATION_BUCKETS)
        self.mean_time_per_token = hist("tgi_request_mean_time_per_token_duration", "inference seconds per token",
                                        DURATION_BUCKETS)
        self.request_duration = hist("tgi_request_duration", "end-to-end seconds", DURATION_BUCKETS)
        self.generated_tokens = hist("tgi_request_generated_tokens", "generated tokens", _linear(max_new_tokens))
        self.total_tokens = hist("tgi_request_total_tokens", "input + generated tokens", _linear(max_sequence_length))
        self.prompt_load_duration = hist("tgi_prompt_load_duration", "prompt prefix load seconds", DURATION_BUCKETS)
        self.batch_next_tokens = hist("tgi_batch_next_tokens", "input tokens in a prefill step",
                                      _powers_of_two(max_sequence_length * max_batch_size))
        self.batch_size = hist("tgi_batch_inference_batch_size", "sequences per step",
                               [float(i) for i in range(1, max_batch_size + 1)], ("method",))
        self.batch_duration = hist("tgi_batch_inference_duration", "step seconds", DURATION_BUCKETS,
                                   ("method", "makeup"))
        self.batch_forward_duration = hist("tgi_batch_inference_forward_duration", "worker forward seconds",
                                           DURATION_BUCKETS, ("method", "makeup"))
        self.batch_tokproc_duration = hist("tgi_batch_inference_tokproc_duration", "token processing seconds",
                                           DURATION_BUCKETS, ("method", "makeup"))
        self.tokenize_tokens = hist("tgi_tokenize_request_tokens", "tokens per Tokenize call", TOKENIZE_TOKEN_BUCKETS)
        self.tokenize_duration = hist("tgi_tokenize_request_duration", "Tokenize seconds", DURATION_BUCKETS)
        # Not in TGIS; asked for by users.
        self.time_to_first_token = hist("tgi_request_time_to_first_token_duration",
                                        "seconds from request to first generated token", DURATION_BUCKETS)
        self.inter_token_latency = hist("tgi_request_inter_token_latency_duration",
                                        "seconds between generated tokens", DURATION_BUCKETS)

        self.batch_current_size = Gauge("tgi_batch_current_size", "sequences in the running batch", registry=r)
        self.batch_input_tokens = Gauge("tgi_batch_input_tokens", "input + generated tokens in the batch", registry=r)
        self.batch_max_remaining_tokens = Gauge("tgi_batch_max_remaining_tokens",
                                                "sum of remaining tokens in the batch", registry=r)
        self.queue_size = Gauge("tgi_queue_size", "requests waiting", registry=r)
        # Not in TGIS: the tokenizer pool of this pipeline.
        self.tokenizer_pool_size = Gauge("tgi_tokenizer_pool_size", "tokenizer processes in the pool", registry=r)
        self.tokenizer_handled = Counter("tgi_tokenizer_messages_handled", "replies from each tokenizer process",
                                         ["tokenizer"], registry=r)
        # Not in TGIS: the KV block pool (prefix cache hit rate = hit / queried tokens).
        self.prefix_cache_queried = Counter("tgi_prefix_cache_queried_tokens", "prompt tokens looked up in the "
                                            "prefix cache", registry=r)
        self.prefix_cache_hit = Counter("tgi_prefix_cache_hit_tokens", "prompt tokens found in the prefix cache",
                                        registry=r)
        self.preemptions = Counter("tgi_kv_preemption", "sequences preempted for lack of KV blocks", registry=r)
        # Not in TGIS: the model replicas as this gateway sees them (their own load reports; inputs it sent each).
        self.replica_queue_size = Gauge("tgi_replica_queue_size", "requests waiting in a replica", ["replica"], registry=r)
        self.replica_batch_size = Gauge("tgi_replica_batch_size", "sequences running in a replica", ["replica"], registry=r)
        self.replica_ready = Gauge("tgi_replica_ready", "1 when a replica takes work", ["replica"], registry=r)
        self.replica_requests = Counter("tgi_replica_request_count", "inputs this gateway sent to a replica (re-sends "
                                        "included)", ["replica"], registry=r)
        # Not in TGIS (the vLLM TGIS adapter has only vLLM's lora_requests_info gauge): per LoRA adapter.
        self.lora_requests = Counter("tgi_lora_request_count", "inputs queued with a LoRA adapter", ["adapter_id"],
                                     registry=r)
        self.lora_generated_tokens = Counter("tgi_lora_generated_tokens", "tokens generated with a LoRA adapter "
                                             "(finished inputs)", ["adapter_id"], registry=r)

    # ------------------------------------------------------------------ recording

    def record_success(self, generation, count: int, stop_reason: str, kind: str, total: float) -> None:
        """An input finished (not ERROR/CANCELLED): TGIS's per-request figures, plus TTFT and inter-token gaps."""
        now = time.monotonic()
        self.request_success.labels(stop_reason, kind).inc()
        self.request_duration.observe(total)
        self.queue_duration.observe(generation.queue_duration)
        self.generated_tokens.observe(count)
        if generation.params.adapter_id:
            self.lora_generated_tokens.labels(generation.params.adapter_id).inc(count)
        self.total_tokens.observe(count + generation.input.input_length)
        if generation.first_token_at is not None:
            # TGIS: from leaving the queue (so the prefill counts) to the end; generation.received_at = submission.
            inference = max(0.0, now - generation.received_at - generation.queue_duration)
            self.inference_duration.observe(inference)
            if count:
                self.mean_time_per_token.observe(inference / count)
            self.time_to_first_token.observe(max(0.0, total - (now - generation.first_token_at)))
        for gap in generation.inter_token:
            self.inter_token_latency.observe(gap)

    def record_step(self, stats: StepStats) -> None:
        method, makeup = stats.method, "single_only"
        self.batch_inference_count.labels(method).inc()
        self.batch_inference_success.labels(method).inc()
        self.batch_size.labels(method).observe(stats.batch_size)
        self.batch_duration.labels(method, makeup).observe(stats.duration)
        self.batch_forward_duration.labels(method, makeup).observe(stats.forward_duration)
        self.batch_tokproc_duration.labels(method, makeup).observe(max(0.0, stats.duration - stats.forward_duration))
        if stats.prefill_tokens:
            self.batch_next_tokens.observe(stats.prefill_tokens)
        if stats.concatenated:
            self.batch_concatenation.inc()
        for counter, value in ((self.queue_jump, stats.queue_jumps),
                               (self.granular_batch_addition, stats.granular_additions),
                               (self.prefill_weight_limit_exceeded, stats.prefill_weight_exceeded),
                               (self.prefix_cache_queried, stats.prefix_queried_tokens),
                               (self.prefix_cache_hit, stats.prefix_hit_tokens),
                               (self.preemptions, stats.preemptions)):
            if value:
                counter.inc(value)
        self.set_batch_gauges(stats.running, stats.batch_input_tokens, stats.batch_remaining_tokens, stats.queue_size)

    def record_step_failure(self, message: str, generations: list[Any]) -> None:
        """A failed forward pass, as the scheduler's RequestFailed reports it.

        The message does not say which kind of step failed: if one of the
        failed requests had no token yet, the step was prefilling it.
        """
        if message in NOT_A_STEP_FAILURE or not generations:
            return
        method = "prefill" if any(g.first_token_at is None for g in generations) else "next_token"
        self.batch_inference_count.labels(method).inc()
        self.batch_inference_failure.labels(method, failure_reason(message)).inc()

    def record_finished(self, generation: Any) -> None:
        """A generation ended: one that never got a token timed out in the queue (TGIS: err="timeout")."""
        if generation.first_token_at is None:
            self.request_failure.labels("timeout").inc()

    def tokenizer_handled_one(self, name: str) -> None:
        self.tokenizer_handled.labels(name).inc()

    def set_tokenizers(self, names: list[str]) -> None:
        """Pool membership changed: export the pool size and a (possibly 0) counter per member."""
        self.tokenizer_pool_size.set(len(names))
        for name in names:
            self.tokenizer_handled.labels(name)

    def set_replica(self, name: str, queue_size: int, batch_size: int, ready: bool) -> None:
        self.replica_queue_size.labels(name).set(queue_size)
        self.replica_batch_size.labels(name).set(batch_size)
        self.replica_ready.labels(name).set(1 if ready else 0)

    def replica_routed(self, name: str, inputs: int) -> None:
        self.replica_requests.labels(name).inc(inputs)

    def set_batch_gauges(self, size: int, input_tokens: int, remaining: int, queue_size: int) -> None:
        self.batch_current_size.set(size)
        self.batch_input_tokens.set(input_tokens)
        self.batch_max_remaining_tokens.set(remaining)
        self.queue_size.set(queue_size)

    # ------------------------------------------------------------------ exposition

    def render(self) -> bytes:
        return render(self.registry)


def _escape_help(text: str) -> str:
    return text.replace("\\", r"\\").replace("\n", r"\n")


def _escape_label(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def _sample(name: str, labels: dict[str, str], value: float) -> str:
    if labels:
        inner = ",".join(f'{k}="{_escape_label(v)}"' for k, v in sorted(labels.items()))
        return f"{name}{{{inner}}} {floatToGoString(value)}\n"
    return f"{name} {floatToGoString(value)}\n"


def render(registry: CollectorRegistry) -> bytes:
    """Prometheus text format as TGIS writes it: counters as `name` and `name_total`, no `_created`."""
    out: list[str] = []
    for family in registry.collect():
        if family.type == "counter":
            samples = [s for s in family.samples if s.name == family.name + "_total"]
            for name in (family.name, family.name + "_total"):
                out.append(f"# HELP {name} {_escape_help(family.documentation)}\n")
                out.append(f"# TYPE {name} counter\n")
                out.extend(_sample(name, s.labels, s.value) for s in samples)
            continue
        out.append(f"# HELP {family.name} {_escape_help(family.documentation)}\n")
        out.append(f"# TYPE {family.name} {family.type}\n")
        out.extend(_sample(s.name, s.labels, s.value) for s in family.samples
                   if not s.name.endswith("_created"))
    return "".join(out).encode()


class _Discard:
    """A metric that records nothing (any .labels(...).inc()/observe()/set() chain)."""

    def labels(self, *_args: Any, **_kwargs: Any) -> _Discard:
        return self

    def inc(self, *_args: Any) -> None:
        pass

    def observe(self, *_args: Any) -> None:
        pass

    def set(self, *_args: Any) -> None:
        pass

    def __call__(self, *_args: Any, **_kwargs: Any) -> None:
        pass


class NullMetrics:
    """Stands in for GatewayMetrics where nothing must be counted (the /health probe's generation)."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return _Discard()
