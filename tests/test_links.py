"""Link settings, discovery and the gateway's replica routing, without processes."""

from __future__ import annotations

import asyncio
import time

import pytest
import zmq
import zmq.asyncio

from services.common import discovery, links
from services.common.protocol import (
    GenerateRequest,
    LogitsParams,
    ModelInfo,
    RequestFailed,
    SchedulerInfo,
    StopParams,
    token_ids,
)
from services.common.zmq_io import make_socket
from services.gateway.generation import FailedEvent, Generation
from services.gateway.replicas import ReplicaSet, model_difference
from services.gateway.scheduler_client import SchedulerClient
from services.tokenizer.gateways import GatewayLinks

MODEL = ModelInfo("m", "/m", False, 100, 2, 2, 256, 255, 8, 1, "cpu", "float32")


def test_discovery_names_every_address_and_keeps_literals():
    assert discovery.split(" tcp://a:1, ,ipc:///x.sock,tcp://a:1") == ["tcp://a:1", "ipc:///x.sock"]
    assert discovery.resolve("tcp://127.0.0.1:5,ipc:///x.sock,tcp://localhost:7") == [
        "tcp://127.0.0.1:5", "ipc:///x.sock", "tcp://127.0.0.1:7"]


@pytest.fixture
def keyed(tmp_path):
    links.generate_keys(str(tmp_path))
    links.configure(links.LinkConfig(zmq_heartbeat_interval=0.5, zmq_heartbeat_timeout=2.0,
                                     curve_keys_dir=str(tmp_path)))
    ctx = zmq.Context()
    yield ctx
    links.stop_authenticators()
    ctx.destroy(linger=0)
    links.configure(links.LinkConfig())


def test_tcp_sockets_get_heartbeats_and_curve_roles(keyed):
    server = make_socket(keyed, zmq.ROUTER, bind="tcp://127.0.0.1:*")
    assert server.getsockopt(zmq.HEARTBEAT_IVL) == 500 and server.getsockopt(zmq.HEARTBEAT_TIMEOUT) == 2000
    assert server.curve_server
    client = make_socket(keyed, zmq.DEALER, connect=server.get_string(zmq.LAST_ENDPOINT))
    assert not client.curve_server and client.getsockopt(zmq.MECHANISM) == zmq.CURVE
    local = make_socket(keyed, zmq.DEALER, connect="ipc:///tmp/unused-links-test.sock")
    assert local.getsockopt(zmq.HEARTBEAT_IVL) == 0 and local.getsockopt(zmq.MECHANISM) == zmq.NULL
    client.send(b"hello")
    assert server.poll(5000) and server.recv_multipart()[-1] == b"hello"
    assert links.settings().heartbeat_bound == 2.5


def test_unreadable_keys_stop_the_service(tmp_path):
    with pytest.raises(SystemExit, match="cannot read server.key"):
        links.load_keys(str(tmp_path))


def test_replicas_with_another_model_or_limits_are_named():
    assert model_difference(MODEL, MODEL) == ""
    other = ModelInfo("n", "/elsewhere", False, 100, 2, 2, 512, 255, 4, 2, "cuda", "float16")
    assert model_difference(MODEL, other) == "model_name 'n' != 'm', max_sequence_length 512 != 256"


class Pool:
    """The tokenizer pool's part the replica set uses."""

    def __init__(self) -> None:
        self.closed: list[str] = []

    def close(self, request_id: str) -> None:
        self.closed.append(request_id)


def _request(request_id: str) -> GenerateRequest:
    return GenerateRequest(request_id, token_ids([1, 2]), LogitsParams(), StopParams(max_new_tokens=4), time.time())


async def test_requests_go_by_load_and_a_lost_replicas_untouched_ones_move():
    ctx = zmq.asyncio.Context()
    replicas = ReplicaSet(ctx, "", "gw", Pool())
    try:
        clients = []
        for port in (1, 2, 3):
            client = SchedulerClient(ctx, f"tcp://127.0.0.1:{port}", "gw", replicas.pool)
            client.on_lost, client.on_info, client.on_report = replicas._on_lost, replicas._on_info, replicas._on_report
            replicas.replicas[client.endpoint] = client
            clients.append(client)
        other = SchedulerInfo(ModelInfo("other", "/o", False, 100, 2, 2, 256, 255, 8, 1, "cpu", "float32"), 24)
        for client, info in zip(clients, (SchedulerInfo(MODEL, 24), SchedulerInfo(MODEL, 24), other), strict=True):
            client._dispatch(info)
        assert replicas.info.model == MODEL and replicas.refused == {"tcp://127.0.0.1:3"}
        clients[0].queue_size = 5  # the first reports a queue: new work goes to the second first
        generations = [Generation(f"r{i}", None, None) for i in range(6)]
        replicas.submit(generations, [_request(g.request_id) for g in generations])
        owners = [replicas.owner[g.request_id].endpoint for g in generations]
        assert owners.count("tcp://127.0.0.1:2") == 5 and owners.count("tcp://127.0.0.1:1") == 1
        assert replicas.sent_since_report["tcp://127.0.0.1:2"] == 5
        # The second loses its worker group: the one with a token fails, the others move to the first.
        moved = [g for g in generations if replicas.owner[g.request_id] is clients[1]]
        moved[0].first_token_at = time.monotonic()
        clients[1].generations = {g.request_id: g for g in moved}
        clients[1]._dispatch(RequestFailed([g.request_id for g in moved], "worker rank 0 stopped responding", True))
        assert isinstance(moved[0].events.get_nowait(), FailedEvent)
        assert all(replicas.owner[g.request_id] is clients[0] for g in moved[1:])
        assert not clients[1].workers_ready and replicas._pick() is clients[0]
    finally:
        ctx.destroy(linger=0)


def test_a_tokenizer_keeps_one_link_per_gateway_found():
    ctx = zmq.Context()
    gateways = GatewayLinks(ctx, "tcp://gateway-pool:5570", "t-1")
    try:
        first, second = "tcp://127.0.0.1:1", "tcp://127.0.0.1:2"
        gateways.refresh([first])
        (kept,) = gateways.links.values()
        gateways.refresh([first, second])
        assert [link.endpoint for link in gateways.links.values()] == [first, second]
        assert gateways.links[kept.key] is kept  # the first link (and its members' work) stays
        gateways.refresh([second])
        assert [link.endpoint for link in gateways.links.values()] == [second]
        assert gateways.link_of(kept.sock) is None
    finally:
        gateways.close()
        ctx.destroy(linger=0)


async def test_the_gateway_follows_the_replicas_its_names_resolve_to(monkeypatch):
    found = ["tcp://127.0.0.1:1"]
    monkeypatch.setattr(discovery, "resolve", lambda endpoints: list(found))
    ctx = zmq.asyncio.Context()
    replicas = ReplicaSet(ctx, "tcp://schedulers:5550", "gw", Pool(), discovery_interval=0.05)
    task = asyncio.ensure_future(replicas.run())
    try:
        await asyncio.sleep(0.2)
        assert list(replicas.replicas) == found
        found[:] = ["tcp://127.0.0.1:2", "tcp://127.0.0.1:3"]
        await asyncio.sleep(0.2)
        assert sorted(replicas.replicas) == found and not task.done()
    finally:
        task.cancel()
        ctx.destroy(linger=0)
