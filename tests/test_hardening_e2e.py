"""Hardening, end to end on one pipeline: bad requests and bad frames fail alone, clearly, and hurt no one else.

One pipeline (tiny model) serves every test here; none of them stops a service.
"""

from __future__ import annotations

import concurrent.futures
import random
import time

import grpc
import msgpack
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.common.codec import encode
from services.common.protocol import (
    PROTOCOL_VERSION,
    Cancel,
    DetokResult,
    Heartbeat,
    MessageKind,
    Submit,
    TokenizeResult,
    WorkerReady,
)
from services.gateway.pb import generation_pb2 as pb
from tests.pipeline import Pipeline

pytestmark = pytest.mark.e2e

STREAM_TOKENS = 60


@pytest.fixture(scope="module")
def pipeline(tiny_model_path, tmp_path_factory):
    # WORKER_TIMEOUT_S short: a spoofed heartbeat that became a "rank" would stop the pipeline within the test.
    p = Pipeline(tiny_model_path, tmp_path_factory.mktemp("hardening"), "--max-sequence-length", "256",
                 env={"WORKER_TIMEOUT_S": "3"}).start()
    yield p
    assert p.stop() == 0, p.logs()


def endpoint(pipeline: Pipeline, name: str) -> str:
    return f"ipc://{pipeline.argv[pipeline.argv.index('--ipc-dir') + 1]}/{name}.sock"


def greedy(text: str, max_new_tokens: int = 3, **response) -> pb.BatchedGenerationRequest:
    return pb.BatchedGenerationRequest(
        requests=[pb.GenerationRequest(text=text)],
        params=pb.Parameters(stopping=pb.StoppingCriteria(max_new_tokens=max_new_tokens),
                             response=pb.ResponseOptions(**response)))


def stream(pipeline: Pipeline, text: str, max_new_tokens: int = STREAM_TOKENS):
    request = pb.SingleGenerationRequest(
        request=pb.GenerationRequest(text=text),
        params=pb.Parameters(stopping=pb.StoppingCriteria(max_new_tokens=max_new_tokens,
                                                          min_new_tokens=max_new_tokens)))
    return pipeline.stub.GenerateStream(request, timeout=120)


def assert_serves(pipeline: Pipeline) -> None:
    response = pipeline.stub.Generate(greedy("still there?"), timeout=30).responses[0]
    assert response.generated_token_count == 3
    assert pipeline.health()[0] == 200


def status_of(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


def test_empty_prompt_fails_alone_while_four_streams_finish(pipeline):
    streams = [stream(pipeline, f"innocent stream {i}") for i in range(4)]
    firsts = [next(s) for s in streams]  # all four are in the pipeline
    assert all(f.input_token_count > 0 for f in firsts)
    code, details = status_of(lambda: pipeline.stub.Generate(greedy(""), timeout=30))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details == "input text has no tokens; an empty prompt cannot be generated from"
    for s in streams:
        messages = list(s)
        assert messages[-1].generated_token_count == STREAM_TOKENS
        assert messages[-1].stop_reason == pb.MAX_TOKENS


def test_huge_top_n_is_refused_before_any_work(pipeline):
    request = greedy("word " * 160, max_new_tokens=1, input_tokens=True, top_n_tokens=4294967295)
    started = time.monotonic()
    code, details = status_of(lambda: pipeline.stub.Generate(request, timeout=30))
    assert time.monotonic() - started < 5
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "top_n_tokens=49152" in details and "over the 64 MiB message limit" in details
    # When the reply fits, a top_n above the vocabulary size is served, capped at it.
    capped = greedy("hi", max_new_tokens=1, generated_tokens=True, top_n_tokens=4294967295)
    top = pipeline.stub.Generate(capped, timeout=60).responses[0].tokens[0].top_tokens
    assert 0 < len(top) <= 49152


@pytest.mark.parametrize(("params", "field"), [
    (pb.Parameters(method=pb.SAMPLE, sampling=pb.SamplingParameters(temperature=float("nan"))), "sampling.temperature"),
    (pb.Parameters(method=pb.SAMPLE, sampling=pb.SamplingParameters(top_p=float("inf"))), "sampling.top_p"),
    (pb.Parameters(decoding=pb.DecodingParameters(repetition_penalty=float("nan"))), "decoding.repetition_penalty"),
    (pb.Parameters(decoding=pb.DecodingParameters(
        length_penalty=pb.DecodingParameters.LengthPenalty(start_index=1, decay_factor=float("-inf")))),
     "decoding.length_penalty.decay_factor"),
])
def test_nan_and_inf_parameters_are_refused_naming_the_field(pipeline, params, field):
    request = pb.BatchedGenerationRequest(requests=[pb.GenerationRequest(text="hi")], params=params)
    code, details = status_of(lambda: pipeline.stub.Generate(request, timeout=30))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith(f"{field} must be a finite number")


@pytest.mark.parametrize("method", ["Generate", "GenerateStream", "Tokenize"])
def test_undecodable_request_body_is_invalid_argument(pipeline, method):
    call = (pipeline.channel.unary_stream if method == "GenerateStream" else pipeline.channel.unary_unary)(
        f"/fmaas.GenerationService/{method}", request_serializer=None, response_deserializer=None)
    code, details = status_of(lambda: list(call(b"\xff\xff\xff", timeout=10)) if method == "GenerateStream"
                              else call(b"\xff\xff\xff", timeout=10))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith(f"request body is not a valid {method} request")
    assert_serves(pipeline)


def _body(*fields) -> bytes:
    return msgpack.packb([PROTOCOL_VERSION, list(fields)])


DEEP = b"\x92\x01\x91" + b"\x91" * 5000 + b"\xc0"
BAD_FRAMES = [
    encode(TokenizeResult([1], [])), encode(DetokResult(None)), encode(Cancel(5)), encode(Submit([1])),
    encode(WorkerReady(0, None)), encode(Heartbeat(3)),
    [bytes([MessageKind.SUBMIT]), DEEP], [bytes([MessageKind.DETOK_RESULT]), DEEP], [b"\x03"], [b"\xff", b"x"],
    [bytes([MessageKind.CANCEL]), _body(["a"], "extra")],
]


def random_value(rng: random.Random, depth: int = 0):
    makers = [lambda: None, lambda: rng.random() < 0.5, lambda: rng.randrange(-2**63, 2**64),
              lambda: rng.random() * 1e6, lambda: "x" * rng.randrange(9), lambda: rng.randbytes(rng.randrange(9)),
              lambda: [rng.randrange(100)] * rng.randrange(1, 6)]
    if depth < 3:
        makers += [lambda: [random_value(rng, depth + 1) for _ in range(rng.randrange(4))],
                   lambda: {str(i): random_value(rng, depth + 1) for i in range(rng.randrange(3))}]
    return rng.choice(makers)()


def random_frames(rng: random.Random, count: int) -> list[list[bytes]]:
    """Frames of every kind with fields of random types and shapes, and plain garbage."""
    frames = []
    for _ in range(count):
        kind = bytes([rng.choice(list(MessageKind))])
        if rng.random() < 0.2:
            frames.append([kind, rng.randbytes(rng.randrange(40))])
        else:
            fields = [random_value(rng) for _ in range(rng.randrange(7))]
            frames.append([kind, msgpack.packb([PROTOCOL_VERSION, fields])])
    return frames


@pytest.mark.parametrize("socket_name", ["tokenizers", "scheduler", "results"])
def test_wrong_typed_and_deep_frames_are_dropped(pipeline, socket_name):
    members = pipeline.metric("tgi_tokenizer_pool_size")
    ctx = zmq.Context()
    try:
        peer = ctx.socket(zmq.DEALER)
        peer.setsockopt(zmq.LINGER, 0)
        peer.connect(endpoint(pipeline, socket_name))
        for frames in BAD_FRAMES + random_frames(random.Random(socket_name), 300):
            peer.send_multipart(frames)
        # An unknown tokenizer peer that sends results and heartbeats never joins the pool.
        peer.send_multipart(encode(Heartbeat("intruder")))
        time.sleep(0.5)
        assert_serves(pipeline)
        assert pipeline.metric("tgi_tokenizer_pool_size") == members
    finally:
        ctx.destroy(linger=0)


def test_spoofed_worker_heartbeat_is_ignored(pipeline):
    ctx = zmq.Context()
    try:
        peer = ctx.socket(zmq.DEALER)
        peer.setsockopt(zmq.LINGER, 0)
        peer.connect(endpoint(pipeline, "results"))
        peer.send_multipart(encode(Heartbeat("worker-7")))
        peer.send_multipart(encode(Heartbeat("worker-0")))
        time.sleep(4.5)  # past WORKER_TIMEOUT_S: a rank 7 taken from the heartbeat would have stopped the group
        assert_serves(pipeline)
        assert "worker rank(s) [7]" not in pipeline.logs()
    finally:
        ctx.destroy(linger=0)


def test_every_cancellation_is_counted_once(pipeline):
    """Every input the server received and the client cancelled counts once, at any stage (tokenizing, queued, running)."""
    before = _counters(pipeline)
    calls = []
    for i in range(8):
        call = stream(pipeline, f"cancel me {i}")
        if i % 2:
            next(call)  # half of them after their first message, half at once
        calls.append(call)
    # A long text takes a while to tokenize (then it is truncated to fit): cancelled while being tokenized.
    long_unary = greedy("cancel me too " * 20_000, max_new_tokens=60)
    long_unary.params.truncate_input_tokens = 50
    for _ in range(4):
        call = pipeline.stub.Generate.future(long_unary, timeout=60)
        time.sleep(0.03)
        calls.append(call)
    for call in calls:
        call.cancel()
    time.sleep(2.0)
    received, cancelled = (after - first for after, first in zip(_counters(pipeline), before, strict=True))
    assert received >= 8 and cancelled == received


def _counters(pipeline: Pipeline) -> tuple[float, float]:
    """(inputs received, inputs cancelled) so far."""
    samples = dict(line.rsplit(" ", 1) for line in pipeline.metrics().splitlines() if not line.startswith("#"))
    return (float(samples.get("tgi_request_input_count_total", 0)),
            float(samples.get('tgi_request_failure_total{err="cancelled"}', 0)))


@st.composite
def generation_requests(draw) -> bytes:
    """Raw bodies: protobuf requests with wild values, or arbitrary bytes."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=64))
    sampling = pb.SamplingParameters(
        temperature=draw(st.floats(width=32)), top_k=draw(st.integers(0, 2**32 - 1)),
        top_p=draw(st.floats(width=32)), typical_p=draw(st.floats(width=32)))
    if draw(st.booleans()):
        sampling.seed = draw(st.integers(0, 2**64 - 1))
    request = pb.BatchedGenerationRequest(
        requests=[pb.GenerationRequest(text=t) for t in draw(st.lists(st.text(max_size=30), max_size=3))],
        params=pb.Parameters(
            method=draw(st.sampled_from([pb.GREEDY, pb.SAMPLE])), sampling=sampling,
            stopping=pb.StoppingCriteria(
                max_new_tokens=draw(st.integers(0, 2**32 - 1)) if draw(st.booleans()) else draw(st.integers(0, 4)),
                min_new_tokens=draw(st.integers(0, 8)),
                time_limit_millis=draw(st.integers(0, 2**32 - 1)) if draw(st.booleans()) else 0,
                stop_sequences=draw(st.lists(st.text(max_size=5), max_size=7))),
            response=pb.ResponseOptions(
                input_text=draw(st.booleans()), generated_tokens=draw(st.booleans()),
                input_tokens=draw(st.booleans()), token_logprobs=draw(st.booleans()),
                token_ranks=draw(st.booleans()), top_n_tokens=draw(st.integers(0, 2**32 - 1))),
            decoding=pb.DecodingParameters(repetition_penalty=draw(st.floats(width=32))),
            truncate_input_tokens=draw(st.integers(0, 2**32 - 1))),
    )
    if draw(st.booleans()):
        request.prefix_id = draw(st.text(max_size=5))
    return request.SerializeToString()


def test_fuzzed_requests_get_an_answer_or_a_clear_status(pipeline):
    channel = pipeline.channel
    calls = {
        "Generate": channel.unary_unary("/fmaas.GenerationService/Generate", request_serializer=None,
                                        response_deserializer=None),
        # The same bytes read as the other methods' request types: unknown fields, clashing wire types.
        "GenerateStream": lambda body, timeout: list(channel.unary_stream(
            "/fmaas.GenerationService/GenerateStream", request_serializer=None, response_deserializer=None)(
                body, timeout=timeout)),
        "Tokenize": channel.unary_unary("/fmaas.GenerationService/Tokenize", request_serializer=None,
                                        response_deserializer=None),
    }
    codes: dict[grpc.StatusCode, int] = {}

    @settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(method=st.sampled_from(sorted(calls)), body=generation_requests())
    def check(method: str, body: bytes) -> None:
        try:
            calls[method](body, timeout=30)
            codes[grpc.StatusCode.OK] = codes.get(grpc.StatusCode.OK, 0) + 1
        except grpc.RpcError as exc:
            assert exc.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED), \
                (method, exc.code(), exc.details())
            assert exc.details(), exc.code()
            codes[exc.code()] = codes.get(exc.code(), 0) + 1

    check()
    assert codes.get(grpc.StatusCode.OK) and codes.get(grpc.StatusCode.INVALID_ARGUMENT), codes
    assert_serves(pipeline)


def test_a_small_request_is_not_held_up_by_a_big_detail_request(pipeline):
    big = greedy("word " * 200, max_new_tokens=40, input_tokens=True, generated_tokens=True, top_n_tokens=400,
                 token_logprobs=True)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        slow = pool.submit(pipeline.stub.Generate, big, timeout=120)
        time.sleep(0.3)
        started = time.monotonic()
        assert_serves(pipeline)
        small_seconds = time.monotonic() - started
        assert slow.result().responses[0].generated_token_count == 40
    assert small_seconds < 10
