"""CurveZMQ on the internal tcp links: keys from `text-generation-server generate-curve-keys`; strangers are refused.

A scheduler (no workers needed: it answers pings) and a gateway run with
CURVE_KEYS_DIR; a tokenizer with the keys joins the gateway's pool.  Clients
with a wrong key pair, or no curve at all, can neither join the pool nor get
an answer from the scheduler; the services log the refusals and keep serving.
"""

from __future__ import annotations

import subprocess
import time

import pytest
import zmq
import zmq.auth

from services.common.codec import decode, encode
from services.common.protocol import (
    GenerateRequest,
    LogitsParams,
    Ping,
    Pong,
    RequestFailed,
    StopParams,
    Submit,
    TokenizerHello,
    token_ids,
)
from tests.cluster import BIN, Cluster, GatewayPorts, Replica, tcp, wait_for

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def secured(tiny_model_path, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("curve")
    keys = tmp / "keys"
    out = subprocess.run([str(BIN / "text-generation-server"), "generate-curve-keys", str(keys)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert {p.name for p in keys.iterdir()} == {"server.key", "server.key_secret", "client.key", "client.key_secret"}
    cluster = Cluster(tmp, {"CURVE_KEYS_DIR": str(keys), "MODEL_NAME": str(tiny_model_path)})
    replica, gateway = Replica(), GatewayPorts()
    cluster.scheduler("scheduler", replica)
    cluster.gateway("gateway", gateway, [replica])
    cluster.tokenizer("tokenizer-1", [gateway])
    wait_for(lambda: "tokenizer tokenizer-1 joined the pool" in cluster.procs["gateway"].logs(), 60,
             "the keyed tokenizer never joined", cluster.all_logs)
    yield cluster, keys, replica, gateway
    cluster.stop()


def client(ctx: zmq.Context, endpoint: str, server_public: bytes | None) -> zmq.Socket:
    """A DEALER with a fresh (unknown) key pair that trusts `server_public`; None: no curve at all."""
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    if server_public is not None:
        public, secret = zmq.curve_keypair()
        sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = server_public, public, secret
    sock.connect(endpoint)
    return sock


def keyed_client(ctx: zmq.Context, endpoint: str, keys) -> zmq.Socket:
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.curve_serverkey = zmq.auth.load_certificate(keys / "server.key")[0]
    sock.curve_publickey, sock.curve_secretkey = zmq.auth.load_certificate(keys / "client.key_secret")
    sock.connect(endpoint)
    return sock


def answer_to(sock: zmq.Socket, message: object, timeout_ms: int) -> object | None:
    try:
        sock.send_multipart(encode(message), zmq.NOBLOCK)
    except zmq.Again:  # the refused handshake took the only connection away: nothing can be sent
        return None
    if not sock.poll(timeout_ms):
        return None
    return decode(sock.recv_multipart())


def submit(request_id: str) -> Submit:
    return Submit([GenerateRequest(request_id, token_ids([1, 2]), LogitsParams(), StopParams(max_new_tokens=2), 0.0)])


def test_strangers_cannot_join_the_pool_or_reach_the_scheduler(secured):
    cluster, keys, replica, gateway = secured
    server_public = zmq.auth.load_certificate(keys / "server.key")[0]
    ctx = zmq.Context()
    try:
        for i, trusted in enumerate((server_public, None)):
            rogue = client(ctx, tcp(gateway.pool), trusted)
            rogue.send_multipart(encode(TokenizerHello(name=f"rogue-{i}", pid=1)))
            stranger = client(ctx, tcp(replica.gateways), trusted)
            assert answer_to(stranger, submit(f"rogue-{i}"), 1500) is None
            assert answer_to(stranger, Ping(7), 500) is None
        time.sleep(1.0)
        gateway_log = cluster.procs["gateway"].logs()
        assert "rogue" not in gateway_log
        assert "refused a connection with an unknown CurveZMQ client key" in gateway_log
        assert "refused a connection with an unknown CurveZMQ client key" in cluster.procs["scheduler"].logs()
        # Both keep serving the peers that hold the keys.
        keyed = keyed_client(ctx, tcp(replica.gateways), keys)
        pong = answer_to(keyed, Ping(7), 5000)
        assert isinstance(pong, Pong) and pong.nonce == 7 and not pong.workers_ready
        # A submission gets through (and is refused for want of workers: this replica has none).
        refused = answer_to(keyed, submit("keyed-1"), 5000)
        assert isinstance(refused, RequestFailed) and refused.request_ids == ["keyed-1"] and refused.retryable
        member = keyed_client(ctx, tcp(gateway.pool), keys)
        member.send_multipart(encode(TokenizerHello(name="keyed-client", pid=2)))
        wait_for(lambda: "tokenizer keyed-client joined the pool" in cluster.procs["gateway"].logs(), 10,
                 "a client with the keys could not join", cluster.all_logs)
        assert all(p.alive for p in cluster.procs.values())
    finally:
        ctx.destroy(linger=0)


def test_missing_keys_stop_a_service_at_start(secured, tmp_path):
    cluster, _, replica, _ = secured
    proc = cluster.start("keyless-scheduler", "text-generation-scheduler", {
        "CURVE_KEYS_DIR": str(tmp_path / "nowhere"), "SCHEDULER_ENDPOINT": tcp(replica.gateways)})
    assert proc.process.wait(30) != 0
    assert "CURVE_KEYS_DIR" in proc.logs() and "cannot read server.key" in proc.logs()
