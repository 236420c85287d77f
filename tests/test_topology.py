"""Scale-out topology: 2 gateways x 3 tokenizers x 2 model replicas, each service its own console script over tcp.

The tests run in order on one cluster (tiny model), each changing it:
load through both gateways, a tokenizer killed and one added, a tokenizer and
a gateway frozen (heartbeats), a gateway killed, a replica's worker killed, a
replica added, and a gateway rollout.  Every answer that comes back equals
transformers' greedy output for its prompt.
"""

from __future__ import annotations

import asyncio
import functools
import signal

import grpc
import pytest

from services.gateway.pb import generation_pb2_grpc
from tests import reference
from tests.cluster import Cluster, GatewayPorts, Replica, http_get, metric_values, tcp, wait_for
from tests.pipeline import greedy_call

pytestmark = pytest.mark.e2e

PROMPTS = ["The quick brown fox", "Once upon a time", "def main():", "Water boils at", "In 1969,", "Dear diary"]
TOKENIZER_TIMEOUT = 1.5  # TOKENIZER_HEARTBEAT_TIMEOUT_S
ZMQ_BOUND = 0.3 + 1.5  # ZMQ_HEARTBEAT_INTERVAL_S + ZMQ_HEARTBEAT_TIMEOUT_S
BATCH = 4


class Topology:
    def __init__(self, cluster: Cluster, model) -> None:
        self.cluster, self.model = cluster, model
        self.replicas = [Replica(), Replica(), Replica()]  # the third joins later
        self.gateways = [GatewayPorts(), GatewayPorts(), GatewayPorts()]  # the third is the rollout's

    def start_replica(self, i: int) -> None:
        self.cluster.scheduler(f"scheduler-{i}", self.replicas[i])
        self.cluster.worker(f"worker-{i}", self.replicas[i])

    def start_gateway(self, i: int) -> None:
        self.cluster.gateway(f"gateway-{i}", self.gateways[i], self.replicas)

    def start_tokenizer(self, i: int) -> None:
        self.cluster.tokenizer(f"tokenizer-{i}", self.gateways)

    def proc(self, name: str):
        return self.cluster.procs[name]

    def metric(self, g: int, name: str, **labels: str) -> float:
        key = ",".join(f'{k}="{v}"' for k, v in labels.items())
        return metric_values(self.gateways[g].http, name).get(key, 0.0)

    def wait_pool(self, g: int, size: int, timeout: float = 30) -> float:
        return wait_for(lambda: self.metric(g, "tgi_tokenizer_pool_size") == size, timeout,
                        f"gateway-{g}'s pool never had {size} member(s)", self.cluster.all_logs)

    def wait_replica_ready(self, g: int, r: int, timeout: float = 90) -> None:
        wait_for(lambda: self.metric(g, "tgi_replica_ready", replica=tcp(self.replicas[r].gateways)) == 1, timeout,
                 f"gateway-{g} never saw replica {r} ready", self.cluster.all_logs)

    def wait_healthy(self, g: int, timeout: float = 120) -> None:
        wait_for(lambda: http_get(self.gateways[g].http, "/health")[0] == 200, timeout,
                 f"gateway-{g} never became healthy", self.cluster.all_logs)


@pytest.fixture(scope="module")
def topo(tiny_model_path, tmp_path_factory):
    cluster = Cluster(tmp_path_factory.mktemp("topology"), {
        "MODEL_NAME": str(tiny_model_path), "MAX_SEQUENCE_LENGTH": "256", "MAX_BATCH_SIZE": str(BATCH),
        "KV_CACHE_MEMORY": "32MiB", "ZMQ_HEARTBEAT_INTERVAL_S": "0.3", "ZMQ_HEARTBEAT_TIMEOUT_S": "1.5",
        "TOKENIZER_HEARTBEAT_INTERVAL": "0.3", "TOKENIZER_HEARTBEAT_TIMEOUT_S": str(TOKENIZER_TIMEOUT),
        "DRAIN_GRACE_PERIOD_S": "5"})
    t = Topology(cluster, tiny_model_path)
    try:
        for i in range(2):
            t.start_replica(i)
            t.start_gateway(i)
        for i in range(3):
            t.start_tokenizer(i)
        for g in range(2):
            t.wait_healthy(g)
            t.wait_pool(g, 3)
            for r in range(2):
                t.wait_replica_ready(g, r)
        yield t
    finally:
        cluster.stop()


@functools.lru_cache(maxsize=64)
def expected(model, prompt: str, max_new: int) -> tuple[str, int, int]:
    e = reference.greedy(model, prompt, max_new)
    return e.text, e.generated_token_count, e.stop_reason


async def _one(stub, prompt: str, max_new: int, stream: bool):
    try:
        return await greedy_call(stub, prompt, max_new, stream, timeout=90)
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details()


def load(t: Topology, per_gateway: dict[int, int], max_new: int, during=None, when=None):
    """Concurrent greedy calls (every other one streamed) through each gateway: {g: [(prompt, result)]}.

    `during()` runs once `when()` holds, while the calls are in flight.
    """
    async def run():
        channels = {g: grpc.aio.insecure_channel(f"127.0.0.1:{t.gateways[g].grpc}") for g in per_gateway}
        try:
            jobs = {g: [PROMPTS[i % len(PROMPTS)] for i in range(n)] for g, n in per_gateway.items()}
            tasks = {g: [asyncio.ensure_future(_one(generation_pb2_grpc.GenerationServiceStub(channels[g]), p,
                                                    max_new, i % 2 == 1)) for i, p in enumerate(prompts)]
                     for g, prompts in jobs.items()}
            if during is not None:
                loop = asyncio.get_running_loop()
                deadline = loop.time() + 30
                while not await loop.run_in_executor(None, when):
                    assert loop.time() < deadline, f"the calls never reached the state to act in\n{t.cluster.all_logs()}"
                    await asyncio.sleep(0.05)
                during()
            return {g: list(zip(jobs[g], await asyncio.wait_for(asyncio.gather(*tasks[g]), 120), strict=True))
                    for g in jobs}
        finally:
            for channel in channels.values():
                await channel.close()
    return asyncio.run(run())


def assert_all_correct(t: Topology, results, max_new: int) -> None:
    for prompt, result in results:
        assert result == expected(t.model, prompt, max_new), (prompt, result)


def test_load_through_both_gateways_uses_both_replicas(topo):
    results = load(topo, {0: 40, 1: 40}, 16)
    for g in (0, 1):
        assert_all_correct(topo, results[g], 16)
        for r in (0, 1):
            assert topo.metric(g, "tgi_replica_request_count", replica=tcp(topo.replicas[r].gateways)) > 0, (g, r)
        handled = metric_values(topo.gateways[g].http, "tgi_tokenizer_messages_handled")
        assert len([v for v in handled.values() if v > 0]) == 3, handled


def test_every_gateway_shows_the_whole_pools_batch(topo):
    # Calls through gateway 0 only: gateway 1's batch gauge still shows them (the replicas' own reports, which
    # come once a second: enough calls and tokens to keep batches running for several seconds on a fast machine).
    results = load(topo, {0: 16}, 200, during=lambda: None, when=lambda: topo.metric(1, "tgi_batch_current_size") >= 2)
    assert_all_correct(topo, results[0], 200)


def test_killed_tokenizer_loses_no_request_and_an_added_one_serves_both_gateways(topo):
    victim = topo.proc("tokenizer-0")
    results = load(topo, {0: 12, 1: 12}, 100, during=lambda: victim.signal(signal.SIGKILL),
                   when=lambda: topo.metric(0, "tgi_batch_current_size") >= 2)
    assert victim.process.wait(10) == -signal.SIGKILL
    for g in (0, 1):
        assert_all_correct(topo, results[g], 100)
        topo.wait_pool(g, 2)
    topo.start_tokenizer(3)
    for g in (0, 1):
        topo.wait_pool(g, 3)
    results = load(topo, {0: 8, 1: 8}, 8)
    for g in (0, 1):
        assert_all_correct(topo, results[g], 8)
        assert topo.metric(g, "tgi_tokenizer_messages_handled", tokenizer="tokenizer-3") > 0, g


def test_frozen_tokenizer_and_gateway_are_dropped_within_the_bound(topo):
    frozen = topo.proc("tokenizer-1")
    frozen.signal(signal.SIGSTOP)
    try:
        for g in (0, 1):
            assert topo.wait_pool(g, 2, timeout=10) < TOKENIZER_TIMEOUT + 2.5
    finally:
        frozen.signal(signal.SIGCONT)
    for g in (0, 1):
        topo.wait_pool(g, 3)
    gateway = topo.proc("gateway-1")
    lost = f"Lost the gateway at {tcp(topo.gateways[1].pool)}"
    tokenizers = [topo.proc(f"tokenizer-{i}") for i in (1, 2, 3)]
    before = [p.logs().count(lost) for p in tokenizers]
    gateway.signal(signal.SIGSTOP)
    try:
        took = wait_for(lambda: all(p.logs().count(lost) > n for p, n in zip(tokenizers, before, strict=True)), 10,
                        "the tokenizers never dropped the frozen gateway", topo.cluster.all_logs)
        assert took < ZMQ_BOUND + 2.5
        # The other gateway serves on meanwhile.
        assert_all_correct(topo, load(topo, {0: 4}, 8)[0], 8)
    finally:
        gateway.signal(signal.SIGCONT)
    topo.wait_pool(1, 3)
    assert_all_correct(topo, load(topo, {1: 4}, 8)[1], 8)


def test_killed_gateway_fails_only_its_own_calls(topo):
    victim = topo.proc("gateway-1")
    results = load(topo, {0: 10, 1: 10}, 100, during=lambda: victim.signal(signal.SIGKILL),
                   when=lambda: topo.metric(0, "tgi_batch_current_size") >= 4)
    assert_all_correct(topo, results[0], 100)
    failed = [r for _, r in results[1] if isinstance(r[0], grpc.StatusCode)]
    assert failed, results[1]
    assert_all_correct(topo, [(p, r) for p, r in results[1] if r not in failed], 100)
    assert all(topo.proc(f"tokenizer-{i}").alive for i in (1, 2, 3))
    topo.wait_pool(0, 3)


def test_killed_worker_fails_only_its_replicas_running_requests(topo):
    lost_replica, other = tcp(topo.replicas[1].gateways), tcp(topo.replicas[0].gateways)

    def both_busy_and_queued() -> bool:
        return (topo.metric(0, "tgi_replica_batch_size", replica=other) >= 1
                and topo.metric(0, "tgi_replica_batch_size", replica=lost_replica) >= 1
                and topo.metric(0, "tgi_replica_queue_size", replica=lost_replica) >= 1)

    results = load(topo, {0: 16}, 200, during=lambda: topo.proc("worker-1").signal(signal.SIGKILL),
                   when=both_busy_and_queued)[0]
    failed = [r for _, r in results if isinstance(r[0], grpc.StatusCode)]
    assert 1 <= len(failed) <= BATCH, results
    assert set(failed) == {(grpc.StatusCode.UNKNOWN,
                            "Request failed during generation: worker rank 0 stopped responding")}
    assert_all_correct(topo, [(p, r) for p, r in results if r not in failed], 200)
    assert f"re-sent to replica {other}" in topo.proc("gateway-0").logs()


def test_a_new_replica_takes_work(topo):
    topo.start_replica(2)
    new = tcp(topo.replicas[2].gateways)
    topo.wait_replica_ready(0, 2)
    assert_all_correct(topo, load(topo, {0: 12}, 16)[0], 16)
    assert topo.metric(0, "tgi_replica_request_count", replica=new) > 0


def test_gateway_rollout_keeps_the_whole_tokenizer_pool(topo):
    topo.start_gateway(2)
    topo.wait_healthy(2)
    topo.wait_pool(2, 3)
    old = topo.proc("gateway-0")
    old.signal(signal.SIGTERM)
    assert old.process.wait(30) == 0
    assert_all_correct(topo, load(topo, {2: 6}, 16)[2], 16)
    assert all(topo.proc(f"tokenizer-{i}").alive for i in (1, 2, 3))
    ready = [topo.metric(2, "tgi_replica_ready", replica=tcp(r.gateways)) for r in topo.replicas]
    assert ready == [1.0, 0.0, 1.0]  # the replica without a worker gets no work
