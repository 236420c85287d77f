"""The scheduler's worker side on real sockets: ranks are their handshake, and any failure stops a tensor-parallel group."""

from __future__ import annotations

import time

import pytest
import zmq

from services.common.codec import decode, encode
from services.common.protocol import Heartbeat, Shutdown, Step, StepFailed, Welcome, WorkerHello
from services.scheduler.config import SchedulerConfig
from services.scheduler.main import SchedulerProcess


@pytest.fixture
def group(tmp_path):
    """A two-rank scheduler, a SUB socket watching what it publishes, and a DEALER that is rank 1."""
    config = SchedulerConfig(num_shard=2, gateway_endpoint=f"ipc://{tmp_path}/g", step_endpoint=f"ipc://{tmp_path}/s",
                             result_endpoint=f"ipc://{tmp_path}/r", step_timeout=5.0)
    process = SchedulerProcess(config)
    ctx = zmq.Context()
    published = ctx.socket(zmq.SUB)
    published.setsockopt(zmq.SUBSCRIBE, b"")
    published.connect(config.step_endpoint)
    rank1 = ctx.socket(zmq.DEALER)
    rank1.connect(config.result_endpoint)
    time.sleep(0.2)  # the subscription reaches the PUB socket
    yield process, published, rank1
    ctx.destroy(linger=0)
    process.ctx.destroy(linger=0)


def said(process: SchedulerProcess, sock: zmq.Socket, message) -> None:
    sock.send_multipart(encode(message))
    deadline = time.monotonic() + 0.3  # ipc delivers in well under that
    while time.monotonic() < deadline:
        process._receive(50)


def published_messages(sock: zmq.Socket) -> list:
    messages = []
    while sock.poll(200):
        messages.append(decode(sock.recv_multipart()))
    return messages


def test_heartbeats_count_only_from_ranks_that_said_hello(group):
    process, published, rank1 = group
    said(process, rank1, Heartbeat("worker-7"))
    said(process, rank1, WorkerHello(7, 2))  # no such rank in a group of 2
    assert process.last_seen == {} and published_messages(published) == []
    said(process, rank1, WorkerHello(1, 2))
    assert list(process.last_seen) == [1] and published_messages(published) == [Welcome(1)]


def test_any_rank_failure_stops_the_whole_group(group):
    process, published, rank1 = group
    said(process, rank1, WorkerHello(1, 2))
    published_messages(published)
    said(process, rank1, StepFailed(3, 0, "claims to be rank 0"))
    assert published_messages(published) == []
    said(process, rank1, StepFailed(3, 1, "boom"))
    assert published_messages(published) == [Shutdown("rank 1 failed step 3")]
    assert process.last_seen == {}


def test_a_disconnected_rank_stops_the_group_at_once(group):
    process, published, rank1 = group
    said(process, rank1, WorkerHello(1, 2))
    published_messages(published)
    rank1.close(linger=0)
    started = time.monotonic()
    while not process.last_seen == {} and time.monotonic() - started < 2:
        process._receive(50)
    assert published_messages(published) == [Shutdown("worker rank 1 lost")]


def test_a_step_without_result_past_its_deadline_stops_the_group(group):
    process, published, rank1 = group
    said(process, rank1, WorkerHello(1, 2))
    published_messages(published)
    process.in_flight = (Step(4, [], [], []), time.monotonic() - 6.0)
    process._check_worker_liveness()
    assert published_messages(published) == [Shutdown("step 4 timed out")]
    assert process.in_flight is None
