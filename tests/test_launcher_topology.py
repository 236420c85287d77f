"""The launcher's topology flags: --num-gateways, --num-replicas, --internal-transport tcp (tiny model)."""

from __future__ import annotations

import grpc
import pytest

from services.gateway.pb import generation_pb2 as pb
from services.gateway.pb import generation_pb2_grpc
from services.launcher import Child, Launcher, LauncherConfig, check_config
from tests import reference
from tests.cluster import metric_values, wait_for
from tests.pipeline import Pipeline


def test_every_tokenizer_serves_every_gateway_and_every_gateway_every_replica(tmp_path, monkeypatch):
    monkeypatch.setattr(Child, "start", lambda self: None)
    config = LauncherConfig(num_gateways=2, num_replicas=2, num_tokenizers=3, internal_transport="tcp",
                            grpc_port=9000, port=4000, ipc_dir=str(tmp_path))
    launcher = Launcher(config, {})
    launcher.start()
    children = {c.name: c.env for c in launcher.children}
    assert set(children) == {"scheduler", "worker-0", "replica-1-scheduler", "replica-1-worker-0", "tokenizer-1",
                             "tokenizer-2", "tokenizer-3", "gateway", "gateway-1"}
    schedulers = [children["scheduler"]["SCHEDULER_ENDPOINT"], children["replica-1-scheduler"]["SCHEDULER_ENDPOINT"]]
    assert all(e.startswith("tcp://127.0.0.1:") for e in schedulers) and schedulers[0] != schedulers[1]
    assert children["replica-1-worker-0"]["WORKER_STEP_ENDPOINT"] == children["replica-1-scheduler"]["WORKER_STEP_ENDPOINT"]
    assert children["worker-0"]["MASTER_PORT"] != children["replica-1-worker-0"]["MASTER_PORT"]
    pools = [children["gateway"]["TOKENIZER_ENDPOINT"], children["gateway-1"]["TOKENIZER_ENDPOINT"]]
    for gateway in ("gateway", "gateway-1"):
        assert children[gateway]["SCHEDULER_ENDPOINT"] == ",".join(schedulers)
    assert children["tokenizer-1"]["TOKENIZER_ENDPOINT"] == ",".join(pools)
    assert (children["gateway-1"]["GRPC_PORT"], children["gateway-1"]["PORT"]) == ("9001", "4001")
    with pytest.raises(SystemExit, match="internal_transport must be ipc or tcp"):
        check_config(LauncherConfig(internal_transport="udp"))
    with pytest.raises(SystemExit, match="num_replicas must be > 0"):
        check_config(LauncherConfig(num_replicas=0))


@pytest.mark.e2e
def test_two_gateways_two_replicas_over_loopback_tcp(tiny_model_path, tmp_path):
    pipeline = Pipeline(tiny_model_path, tmp_path, "--max-sequence-length", "256", "--num-gateways", "2",
                        "--num-replicas", "2", "--num-tokenizers", "2", "--internal-transport", "tcp").start()
    try:
        # start() returns once the first gateway's /health passes, for which one ready replica suffices; the other
        # replica's worker may still be loading, so wait until every gateway sees both (one that never does fails).
        for offset in (0, 1):
            wait_for(lambda http=pipeline.http_port + offset: list(metric_values(http, "tgi_replica_ready").values())
                     == [1.0, 1.0], 120, f"gateway {offset} sees both replicas ready", pipeline.logs)
        expected = reference.greedy(tiny_model_path, "Once upon a time", 12)
        request = pb.BatchedGenerationRequest(requests=[pb.GenerationRequest(text="Once upon a time")] * 4,
                                              params=pb.Parameters(stopping=pb.StoppingCriteria(max_new_tokens=12)))
        for offset in (0, 1):
            with grpc.insecure_channel(f"127.0.0.1:{pipeline.grpc_port + offset}") as channel:
                stub = generation_pb2_grpc.GenerationServiceStub(channel)
                for r in stub.Generate(request, timeout=60).responses:
                    assert (r.text, r.generated_token_count) == (expected.text, expected.generated_token_count)
            http = pipeline.http_port + offset
            assert metric_values(http, "tgi_tokenizer_pool_size") == {"": 2.0}
            assert list(metric_values(http, "tgi_replica_ready").values()) == [1.0, 1.0]
        assert "tcp://127.0.0.1:" in pipeline.logs() and "2 replica(s)" in pipeline.logs()
    finally:
        assert pipeline.stop() == 0, pipeline.logs()
