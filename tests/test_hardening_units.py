"""Hardening, unit by unit: input hygiene, rank identities, step gaps, the pool loop and the tokenizer's work order."""

from __future__ import annotations

import asyncio
import time
import types

import pytest
import zmq
import zmq.asyncio

from services.common.codec import decode, encode
from services.common.protocol import (
    DetokItem,
    DetokOpen,
    DetokParams,
    DetokResult,
    DetokTokens,
    Heartbeat,
    Tokenize,
    TokenizedText,
    TokenizeResult,
    TokenizerHello,
    token_ids,
)
from services.gateway.health import HealthChecker
from services.gateway.pb import generation_pb2 as pb
from services.gateway.tokenizer_pool import TokenizerPool
from services.gateway.validation import Limits, ValidationError, check_input, convert_and_validate
from services.scheduler.peers import WorkerPeers
from services.worker.main import _step_gap

LIMITS = Limits(256, 255, vocab_size=1000, max_reply_bytes=1 << 20)


def params(**response) -> pb.Parameters:
    return pb.Parameters(response=pb.ResponseOptions(**response))


@pytest.mark.parametrize(("p", "field"), [
    (pb.Parameters(method=pb.SAMPLE, sampling=pb.SamplingParameters(temperature=float("nan"))), "sampling.temperature"),
    (pb.Parameters(sampling=pb.SamplingParameters(typical_p=float("inf"))), "sampling.typical_p"),  # even when greedy
    (pb.Parameters(decoding=pb.DecodingParameters(repetition_penalty=float("-inf"))), "decoding.repetition_penalty"),
])
def test_non_finite_parameters_are_refused_by_name(p, field):
    with pytest.raises(ValidationError, match=f"^{field} must be a finite number"):
        convert_and_validate(p, LIMITS)


def test_empty_input_is_refused():
    with pytest.raises(ValidationError, match="input text has no tokens"):
        check_input(token_ids([]), convert_and_validate(None, LIMITS), LIMITS)


def test_top_n_is_capped_at_the_vocabulary_and_the_reply_must_fit():
    capped = convert_and_validate(params(generated_tokens=True, top_n_tokens=2**32 - 1), LIMITS)
    assert capped.logits.top_n_tokens == 1000
    check_input(token_ids([1] * 10), convert_and_validate(params(generated_tokens=True, top_n_tokens=5), LIMITS), LIMITS)
    with pytest.raises(ValidationError, match="over the 1 MiB message limit"):
        check_input(token_ids([1] * 200), convert_and_validate(params(input_tokens=True, top_n_tokens=1000), LIMITS),
                    LIMITS)


def test_ranks_are_their_handshake_identities():
    peers = WorkerPeers(world_size=2)
    assert peers.refusal(7, 2) == "rank 7 outside 0..1" and peers.refusal(0, 1) == "world size 1 != 2"
    peers.hello(b"results-0", 11, 0)
    peers.hello(b"heartbeat-0", 12, 0)
    assert peers.rank_of(b"heartbeat-0") == 0 and peers.rank_of(b"stranger") is None
    assert peers.disconnected(99) is None  # a connection that never said hello
    assert peers.disconnected(12) == 0 and peers.rank_of(b"heartbeat-0") is None
    peers.forget_rank(0)
    assert peers.rank_of(b"results-0") is None and peers.disconnected(11) is None


def test_step_gaps():
    assert _step_gap(None, 17) is None and _step_gap(5, 5) is None
    assert _step_gap(5, 8) == "missed step(s) 5..7"
    assert _step_gap(5, 2) == "step 2 after 4"


async def test_health_reports_a_stopped_gateway_loop():
    servicer = types.SimpleNamespace(draining=False, scheduler=types.SimpleNamespace(info=object(), reachable=True),
                                     pool=types.SimpleNamespace(members={b"a": 1}))
    checker = HealthChecker(servicer, timeout=1.0)
    checker.dead_loop = lambda: "tokenizer pool"
    assert await checker.check() == (False, "the gateway's tokenizer pool loop stopped")
    checker.dead_loop = lambda: None
    servicer.scheduler.reachable = False
    assert await checker.check() == (False, "scheduler not answering")


async def test_pool_loop_survives_bad_peers_and_admits_only_hello(tmp_path):
    ctx = zmq.asyncio.Context()
    pool = TokenizerPool(ctx, f"ipc://{tmp_path}/pool.sock", heartbeat_timeout=30.0, join_timeout=5.0)
    loop = asyncio.create_task(pool.run())
    peers = []
    try:
        def peer() -> zmq.Socket:
            sock = zmq.Context.instance().socket(zmq.DEALER)
            sock.connect(pool.endpoint)
            peers.append(sock)
            return sock

        intruder = peer()
        intruder.send_multipart(encode(Heartbeat("tok-x")))
        intruder.send_multipart(encode(TokenizeResult(1, [])))
        intruder.send_multipart(encode(TokenizeResult([1], [])))  # wrong type: dropped by the codec
        intruder.send_multipart(encode(DetokResult(None)))
        await asyncio.sleep(0.3)
        assert pool.members == {} and not loop.done()

        member = peer()
        member.send_multipart(encode(TokenizerHello("tok-1", 1)))
        job = asyncio.create_task(pool.tokenize(["hi"]))
        await asyncio.sleep(0.3)
        assert [m.name for m in pool.members.values()] == ["tok-1"]
        # A handler that raises (here the metrics hook) costs that message only; the loop carries on.
        pool.on_handled = lambda name: 1 / 0
        member.send_multipart(encode(DetokResult([])))
        await asyncio.sleep(0.1)
        pool.on_handled = lambda name: None
        # The intruder answering the member's job is ignored; the member's answer is taken.
        intruder.send_multipart(encode(TokenizeResult(1, [TokenizedText(token_ids([666]))])))
        await asyncio.sleep(0.1)
        assert not job.done()
        member.send_multipart(encode(TokenizeResult(1, [TokenizedText(token_ids([5]))])))
        assert [list(t.ids) for t in await asyncio.wait_for(job, 5)] == [[5]]
        assert not loop.done()
    finally:
        loop.cancel()
        for sock in peers:
            sock.close(linger=0)
        ctx.destroy(linger=0)


@pytest.mark.demo_model
def test_tokenizations_overtake_a_long_detail_request(demo_model_path, tmp_path):
    from services.tokenizer.detokenizer import TextDecoder
    from services.tokenizer.encoding import load_tokenizer
    from services.tokenizer.main import TokenizerService, WorkThread

    tokenizer = load_tokenizer(demo_model_path)
    service = TokenizerService(tokenizer, TextDecoder(tokenizer))
    ctx = zmq.Context()
    replies = ctx.socket(zmq.PAIR)
    replies.bind(f"ipc://{tmp_path}/replies.sock")
    worker = WorkThread(ctx, f"ipc://{tmp_path}/replies.sock", service)
    worker.start()
    try:
        # Replies come back after the key of the gateway link that asked.
        worker.put(b"gw", DetokOpen("big", DetokParams([], True, True, 2)))
        worker.put(b"gw", DetokTokens([DetokItem("big", 0, token_ids([5]), piece_ids=token_ids([7] * 1_000_000))]))
        time.sleep(0.05)  # the detail request is under way
        worker.put(b"gw", Tokenize(9, ["small"]))
        replies_in_order = [replies.recv_multipart() for _ in range(2)]
        assert {r[0] for r in replies_in_order} == {b"gw"}
        assert [type(decode(r[1:])).__name__ for r in replies_in_order] == ["TokenizeResult", "DetokResult"]
    finally:
        worker.stop()
        replies.close(linger=0)
        ctx.destroy(linger=0)
