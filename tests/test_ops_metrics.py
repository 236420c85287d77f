"""Operations: the tgi_* metrics on /metrics (TGIS names, kinds, labels, buckets) and the health endpoints.

One pipeline (tiny model) for the module; `traffic` makes one call of every
kind and scrapes /metrics once, so the counts below are exact.
"""

from __future__ import annotations

import math
import re
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.gateway.pb import generation_pb2 as pb
from tests.pipeline import Pipeline

pytestmark = pytest.mark.e2e

MAX_SEQ, MAX_NEW, MAX_BATCH, MAX_CONC = 256, 128, 8, 16

DURATION_BUCKETS = [0.0001 * 1.5**k for k in range(1, 36)]

# Spec §5: name -> label names.
COUNTERS = {
    "tgi_request_count": {"kind"},
    "tgi_request_input_count": set(),
    "tgi_request_failure": {"err"},
    "tgi_request_success": {"stop_reason", "kind"},
    "tgi_batch_concatenation_count": set(),
    "tgi_batch_inference_count": {"method"},
    "tgi_batch_inference_success": {"method"},
    "tgi_batch_inference_failure": {"method", "reason"},
    "tgi_queue_jump": set(),
    "tgi_granular_batch_addition": set(),
    "tgi_prefill_weight_limit_exceeded": set(),
    "tgi_prefill_padding_limit_exceeded": set(),
    "tgi_prompt_load_failure": set(),
    "tgi_tokenize_request_count": set(),
    "tgi_tokenize_request_input_count": set(),
    # This pipeline's own.
    "tgi_tokenizer_messages_handled": {"tokenizer"},
    "tgi_prefix_cache_queried_tokens": set(),
    "tgi_prefix_cache_hit_tokens": set(),
    "tgi_kv_preemption": set(),
    "tgi_replica_request_count": {"replica"},
    "tgi_lora_request_count": {"adapter_id"},
    "tgi_lora_generated_tokens": {"adapter_id"},
}
HISTOGRAMS = {
    "tgi_request_raw_input_length": set(),
    "tgi_request_input_length": set(),
    "tgi_request_max_new_tokens": set(),
    "tgi_request_validation_duration": set(),
    "tgi_request_queue_duration": set(),
    "tgi_request_inference_duration": set(),
    "tgi_request_mean_time_per_token_duration": set(),
    "tgi_request_duration": set(),
    "tgi_request_generated_tokens": set(),
    "tgi_request_total_tokens": set(),
    "tgi_prompt_load_duration": set(),
    "tgi_batch_next_tokens": set(),
    "tgi_batch_inference_batch_size": {"method"},
    "tgi_batch_inference_duration": {"method", "makeup"},
    "tgi_batch_inference_forward_duration": {"method", "makeup"},
    "tgi_batch_inference_tokproc_duration": {"method", "makeup"},
    "tgi_tokenize_request_tokens": set(),
    "tgi_tokenize_request_duration": set(),
    "tgi_request_time_to_first_token_duration": set(),
    "tgi_request_inter_token_latency_duration": set(),
}
GAUGES = {"tgi_batch_current_size", "tgi_batch_input_tokens", "tgi_batch_max_remaining_tokens", "tgi_queue_size",
          "tgi_tokenizer_pool_size", "tgi_replica_queue_size", "tgi_replica_batch_size", "tgi_replica_ready"}


class Scrape:
    """A parsed Prometheus text exposition."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.types: dict[str, str] = {}
        self.samples: list[tuple[str, dict[str, str], float]] = []
        for line in text.splitlines():
            if line.startswith("# TYPE "):
                _, _, name, kind = line.split(" ", 3)
                self.types[name] = kind
            elif line and not line.startswith("#"):
                m = re.fullmatch(r"([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)", line)
                assert m, line
                labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m[2] or ""))
                self.samples.append((m[1], labels, float(m[3])))

    def get(self, name: str, **labels: str) -> float:
        """Sum of the samples of `name` whose labels include `labels`."""
        return sum(v for n, ls, v in self.samples if n == name and labels.items() <= ls.items())

    def series(self, name: str) -> list[dict[str, str]]:
        return [ls for n, ls, _ in self.samples if n == name]

    def buckets(self, name: str, **labels: str) -> list[float]:
        les = []
        for n, ls, _ in self.samples:
            if n == name + "_bucket" and labels.items() <= ls.items() and ls["le"] != "+Inf":
                les.append(float(ls["le"]))
        return sorted(set(les))


@pytest.fixture(scope="module")
def pipeline(tiny_model_path, tmp_path_factory):
    p = Pipeline(tiny_model_path, tmp_path_factory.mktemp("ops-metrics"), "--max-sequence-length", str(MAX_SEQ),
                 "--max-new-tokens", str(MAX_NEW), "--max-batch-size", str(MAX_BATCH),
                 "--max-concurrent-requests", str(MAX_CONC)).start()
    yield p
    assert p.stop() == 0, p.logs()


def params(n: int) -> pb.Parameters:
    return pb.Parameters(stopping=pb.StoppingCriteria(max_new_tokens=n, min_new_tokens=n))


def batch(*texts: str, n: int = 5) -> pb.BatchedGenerationRequest:
    return pb.BatchedGenerationRequest(requests=[pb.GenerationRequest(text=t) for t in texts], params=params(n))


@pytest.fixture(scope="module")
def traffic(pipeline) -> Scrape:
    stub = pipeline.stub
    stub.Generate(batch("Hello there", n=5), timeout=60)                               # single, 5 tokens
    stub.Generate(batch("one", "two", n=3), timeout=60)                                 # batch, 2 x 3 tokens
    stream = pb.SingleGenerationRequest(request=pb.GenerationRequest(text="streaming"), params=params(4))
    assert list(stub.GenerateStream(stream, timeout=60))[-1].generated_token_count == 4  # stream, 4 tokens
    stub.Tokenize(pb.BatchedTokenizeRequest(requests=[pb.TokenizeRequest(text="a b c"),
                                                      pb.TokenizeRequest(text="d")]), timeout=60)
    with pytest.raises(grpc.RpcError) as bad:                                          # single, validation
        stub.Generate(batch("x", n=MAX_NEW + 1), timeout=60)
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as over:                                         # batch, conc_limit
        stub.Generate(batch(*["y"] * (MAX_CONC + 1)), timeout=60)
    assert over.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    long = pb.SingleGenerationRequest(request=pb.GenerationRequest(text="cancel me"), params=params(MAX_NEW))
    call = stub.GenerateStream(long, timeout=60)                                       # stream, cancelled
    for i, _ in enumerate(call):
        if i == 2:
            break
    call.cancel()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        scrape = Scrape(pipeline.metrics())
        if scrape.get("tgi_request_failure", err="cancelled") and not scrape.get("tgi_batch_current_size"):
            return scrape
        time.sleep(0.1)
    raise AssertionError(f"the cancelled stream was not accounted for:\n{scrape.text}")


def test_every_tgis_metric_has_its_kind_and_labels(traffic):
    for name, labels in COUNTERS.items():
        assert traffic.types.get(name) == "counter", name
        assert traffic.types.get(name + "_total") == "counter", name
        for series in traffic.series(name) + traffic.series(name + "_total"):
            assert set(series) == labels, (name, series)
    for name, labels in HISTOGRAMS.items():
        assert traffic.types.get(name) == "histogram", name
        for suffix in ("_sum", "_count"):
            for series in traffic.series(name + suffix):
                assert set(series) == labels, (name, series)
        for series in traffic.series(name + "_bucket"):
            assert set(series) == labels | {"le"}, (name, series)
    for name in GAUGES:
        assert traffic.types.get(name) == "gauge", name
    assert not [n for n, _, _ in traffic.samples if n.endswith("_created")]
    unexpected = {n for n in traffic.types if n.startswith("tgi_")} - (
        set(COUNTERS) | {n + "_total" for n in COUNTERS} | set(HISTOGRAMS) | GAUGES)
    assert not unexpected


def test_counters_are_emitted_as_name_and_name_total(traffic):
    lines = traffic.text.splitlines()
    single = [line for line in lines if line.startswith('tgi_request_count{kind="single"} ')]
    single_total = [line for line in lines if line.startswith('tgi_request_count_total{kind="single"} ')]
    assert single and single_total
    assert single[0].split()[1] == single_total[0].split()[1]
    for name in COUNTERS:
        plain = {(tuple(sorted(ls.items())), v) for n, ls, v in traffic.samples if n == name}
        total = {(tuple(sorted(ls.items())), v) for n, ls, v in traffic.samples if n == name + "_total"}
        assert plain == total, name


def test_buckets_are_tgis(traffic):
    def close(a: list[float], b: list[float]) -> bool:
        return len(a) == len(b) and all(math.isclose(x, y, rel_tol=1e-9) for x, y in zip(a, b, strict=True))

    for name, labels in HISTOGRAMS.items():
        if name.endswith("duration") and not labels:
            assert close(traffic.buckets(name), DURATION_BUCKETS), name
    assert math.isclose(DURATION_BUCKETS[0], 0.00015) and math.isclose(DURATION_BUCKETS[-1], 145.61, rel_tol=1e-4)
    for method in ("prefill", "next_token"):
        assert close(traffic.buckets("tgi_batch_inference_duration", method=method), DURATION_BUCKETS)
        assert close(traffic.buckets("tgi_batch_inference_batch_size", method=method),
                     [float(i) for i in range(1, MAX_BATCH + 1)])
    assert close(traffic.buckets("tgi_tokenize_request_tokens"), [2.0**k for k in range(6, 20)])
    seq = [MAX_SEQ / 64 * i for i in range(1, 65)]
    new = [MAX_NEW / 64 * i for i in range(1, 65)]
    for name in ("tgi_request_input_length", "tgi_request_total_tokens", "tgi_request_raw_input_length"):
        assert close(traffic.buckets(name), seq), name
    for name in ("tgi_request_generated_tokens", "tgi_request_max_new_tokens"):
        assert close(traffic.buckets(name), new), name
    assert close(traffic.buckets("tgi_batch_next_tokens"), [2.0**k for k in range(0, 12)])  # up to 256 * 8


def test_request_metrics_count_what_tgis_counts(traffic):
    t = traffic
    assert (t.get("tgi_request_count", kind="single"), t.get("tgi_request_count", kind="batch"),
            t.get("tgi_request_count", kind="stream")) == (2, 2, 2)
    assert t.get("tgi_request_input_count") == 1 + 2 + 1 + 1 + (MAX_CONC + 1) + 1
    assert t.get("tgi_request_failure", err="validation") == 1
    assert t.get("tgi_request_failure", err="conc_limit") == 1
    assert t.get("tgi_request_failure", err="cancelled") == 1
    # The health probe's start-up generation is not a request: exactly our 4 finished inputs count.
    assert t.get("tgi_request_success", stop_reason="MAX_TOKENS", kind="single") == 1
    assert t.get("tgi_request_success", stop_reason="MAX_TOKENS", kind="batch") == 2
    assert t.get("tgi_request_success", stop_reason="MAX_TOKENS", kind="stream") == 1
    assert t.get("tgi_request_success") == 4
    for name in ("tgi_request_duration", "tgi_request_inference_duration", "tgi_request_queue_duration",
                 "tgi_request_mean_time_per_token_duration", "tgi_request_time_to_first_token_duration"):
        assert t.get(name + "_count") == 4, name
    assert t.get("tgi_request_generated_tokens_sum") == 5 + 3 + 3 + 4
    assert t.get("tgi_request_inter_token_latency_duration_count") == 4 + 2 + 2 + 3
    assert t.get("tgi_request_max_new_tokens_sum") == 5 + 3 + 3 + 4 + MAX_NEW
    assert t.get("tgi_request_input_length_count") == 5  # validated inputs, the cancelled stream's included
    assert t.get("tgi_request_raw_input_length_count") == 5  # max_new_tokens is checked before tokenizing
    assert t.get("tgi_request_validation_duration_count") == 4  # per validated call
    # End to end covers validation and the time to the first token.
    assert t.get("tgi_request_duration_sum") >= t.get("tgi_request_time_to_first_token_duration_sum")
    assert t.get("tgi_tokenize_request_count") == 1 and t.get("tgi_tokenize_request_input_count") == 2
    assert t.get("tgi_tokenize_request_tokens_count") == 1 and t.get("tgi_tokenize_request_duration_count") == 1


def test_batch_metrics_come_from_the_scheduler(traffic):
    t = traffic
    for method in ("prefill", "next_token"):
        assert t.get("tgi_batch_inference_count", method=method) >= 1
        assert t.get("tgi_batch_inference_count", method=method) == t.get("tgi_batch_inference_success", method=method)
        assert t.get("tgi_batch_inference_duration_count", method=method) == t.get(
            "tgi_batch_inference_success", method=method)
    assert t.get("tgi_batch_next_tokens_count") == t.get("tgi_batch_inference_count", method="prefill")
    assert t.get("tgi_batch_current_size") == 0 and t.get("tgi_queue_size") == 0


def test_tokenizer_pool_metrics(traffic):
    assert traffic.get("tgi_tokenizer_pool_size") == 2
    names = {ls["tokenizer"] for ls in traffic.series("tgi_tokenizer_messages_handled")}
    assert names == {"tokenizer-1", "tokenizer-2"}
    assert traffic.get("tgi_tokenizer_messages_handled") > 0


def test_http_health_is_200_with_empty_body(pipeline):
    assert pipeline.health() == (200, "")


def test_grpc_health_serving(pipeline):
    stub = health_pb2_grpc.HealthStub(pipeline.channel)
    for service in ("", "fmaas.GenerationService"):
        response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=30)
        assert response.status == health_pb2.HealthCheckResponse.SERVING, service
    with pytest.raises(grpc.RpcError) as unknown:
        stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=30)
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND


def test_metrics_content_type(pipeline):
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{pipeline.http_port}/metrics", timeout=10) as r:
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")


def test_deadline_passing_in_the_queue_counts_as_timeout(pipeline, traffic):
    """A full batch keeps a request queued past its time limit: TIME_LIMIT, 0 tokens, err="timeout"."""
    import asyncio

    async def run():
        channel, stub = pipeline.aio_stub()
        async with channel:
            full = [asyncio.ensure_future(stub.Generate(batch(f"filler {i}", n=100), timeout=60))
                    for i in range(MAX_BATCH)]
            loop = asyncio.get_running_loop()
            deadline = time.monotonic() + 30
            while await loop.run_in_executor(None, pipeline.metric, "tgi_batch_current_size") < MAX_BATCH:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.02)
            late = batch("late", n=5)
            late.params.stopping.time_limit_millis = 50
            response = (await stub.Generate(late, timeout=60)).responses[0]
            await asyncio.gather(*full)
            return response

    response = asyncio.run(run())
    assert (response.generated_token_count, response.stop_reason, response.text) == (0, pb.TIME_LIMIT, "")
    after = Scrape(pipeline.metrics())
    assert after.get("tgi_request_failure", err="timeout") == 1
    assert after.get("tgi_request_success", stop_reason="TIME_LIMIT", kind="single") == 1


# --------------------------------------------------------------------------- without a pipeline


def test_render_writes_counters_twice_and_no_created_series():
    from services.gateway.metrics import GatewayMetrics

    m = GatewayMetrics(256, 128, 4)
    m.request_count.labels("single").inc(3)
    m.request_success.labels("EOS_TOKEN", "stream").inc()
    m.request_duration.observe(0.5)
    scrape = Scrape(m.render().decode())
    assert scrape.types["tgi_request_count"] == scrape.types["tgi_request_count_total"] == "counter"
    assert scrape.get("tgi_request_count", kind="single") == scrape.get("tgi_request_count_total", kind="single") == 3
    assert 'tgi_request_success{kind="stream",stop_reason="EOS_TOKEN"} 1.0' in scrape.text
    assert scrape.get("tgi_request_duration_count") == 1 and scrape.get("tgi_request_duration_sum") == 0.5
    assert "_created" not in scrape.text


def test_step_failures_and_queue_timeouts_are_counted_as_tgis_does():
    from types import SimpleNamespace

    from services.gateway.metrics import GatewayMetrics, NullMetrics

    m = GatewayMetrics(256, 128, 4)
    running, new = SimpleNamespace(first_token_at=1.0), SimpleNamespace(first_token_at=None)
    m.record_step_failure("GPU out of memory", [running])
    m.record_step_failure("worker rank 1 stopped responding", [running, new])
    m.record_step_failure("boom", [running])
    m.record_step_failure("lost connection to the scheduler", [])  # nothing was in flight
    m.record_step_failure("model not loaded", [new])  # not a forward pass
    m.record_finished(new)  # ended without a token: its deadline passed in the queue
    m.record_finished(running)
    s = Scrape(m.render().decode())
    assert s.get("tgi_batch_inference_failure", method="next_token", reason="oom") == 1
    assert s.get("tgi_batch_inference_failure", method="prefill", reason="connection") == 1
    assert s.get("tgi_batch_inference_failure", method="next_token", reason="error") == 1
    assert s.get("tgi_batch_inference_count") == 3 and s.get("tgi_batch_inference_success") == 0
    assert s.get("tgi_request_failure", err="timeout") == 1
    NullMetrics().request_failure.labels("x").inc()  # records nothing, raises nothing


def test_the_grafana_dashboard_queries_only_exported_series(traffic):
    """k8s/monitoring/grafana-dashboard.json against this live scrape: no panel queries a series that isn't there."""
    import json
    from pathlib import Path

    from tests.dashboard import dashboard_metrics, exposition_names

    dashboard = json.loads((Path(__file__).resolve().parents[1] / "k8s/monitoring/grafana-dashboard.json").read_text())
    missing = dashboard_metrics(dashboard) - exposition_names(traffic.text)
    assert not missing, sorted(missing)
