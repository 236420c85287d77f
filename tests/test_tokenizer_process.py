"""The tokenizer process: its message handling, and the real process talking to a fake gateway."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zmq
from tokenizers import decoders

from services.common.protocol import (
    DetokClose,
    DetokItem,
    DetokOpen,
    DetokParams,
    DetokResult,
    DetokTokens,
    Heartbeat,
    MessageKind,
    StopReason,
    Tokenize,
    TokenizeResult,
    TokenizerGoodbye,
    TokenizerHello,
    token_ids,
)
from services.common.zmq_io import make_socket, recv_from, send_to
from services.tokenizer.detokenizer import TextDecoder
from services.tokenizer.encoding import load_tokenizer
from services.tokenizer.main import TokenizerService

pytestmark = pytest.mark.demo_model

REPO = Path(__file__).resolve().parents[1]
TEXT = " Once upon a time, there was a little girl."


@pytest.fixture(scope="module")
def service(demo_model_path) -> TokenizerService:
    tokenizer = load_tokenizer(demo_model_path)
    return TokenizerService(tokenizer, TextDecoder(tokenizer))


def stream_params(**overrides) -> DetokParams:
    settings = dict(
        stop_sequences=[], include_stop_sequence=True, skip_special_tokens=True, eos_token_id=2, stream=True
    )
    return DetokParams(**{**settings, **overrides})


def test_service_detokenizes_open_requests_only(service):
    ids = service.tokenizer.encode(TEXT).ids
    assert service.handle(DetokOpen("a", stream_params(stop_sequences=[" girl"]))) is None
    result = service.handle(
        DetokTokens(
            [
                DetokItem("a", 0, token_ids(ids[:4]), piece_ids=token_ids(ids[:2])),
                DetokItem("unknown", 3, token_ids(ids[:2])),
            ]
        )
    )
    assert isinstance(result, DetokResult) and not any(d.error for d in result.deltas)
    first, unknown = result.deltas
    assert (first.request_id, first.first_index, first.pieces) == ("a", 0, ["ĠOnce", "Ġupon"])
    assert "".join(first.texts) == " Once upon a tim" and len(first.texts) == 4  # "e" waits for the next id
    assert (unknown.request_id, unknown.first_index, unknown.texts, unknown.stop_reason) == (
        "unknown",
        3,
        [],
        StopReason.NOT_FINISHED,
    )
    # The stop sequence ends the request; a later item for it gets an empty delta.
    stopped, after = service.handle(
        DetokTokens(
            [
                DetokItem("a", 4, token_ids(ids[4:])),
                DetokItem("a", len(ids), token_ids(ids[-1:])),
            ]
        )
    ).deltas
    assert stopped.stop_reason == StopReason.STOP_SEQUENCE and stopped.stop_sequence == " girl"
    assert "".join(first.texts + stopped.texts) == " Once upon a time, there was a little girl"
    assert after.texts == [] and "a" not in service.open


def test_service_replay_and_close(service):
    ids = service.tokenizer.encode(TEXT).ids
    service.handle(DetokOpen("b", stream_params(), replay_ids=token_ids(ids[:5])))
    done = service.handle(DetokTokens([DetokItem("b", 5, token_ids(ids[5:]), StopReason.MAX_TOKENS)])).deltas[0]
    assert "".join(done.texts) == service.tokenizer.decode(ids[4:]) and "b" not in service.open
    service.handle(DetokOpen("c", stream_params()))
    service.handle(DetokClose(["c", "never-opened"]))
    assert "c" not in service.open


def test_service_reports_detokenization_errors(demo_model_path):
    tokenizer = load_tokenizer(demo_model_path)
    tokenizer.decoder = decoders.Replace("a", "b")  # a decoder type TGIS cannot continue from
    broken = TokenizerService(tokenizer, TextDecoder(tokenizer))
    broken.handle(DetokOpen("x", stream_params()))
    broken.handle(DetokOpen("y", stream_params()))
    result = broken.handle(DetokTokens([DetokItem("x", 0, token_ids([100, 200])), DetokItem("y", 0, token_ids([5]))]))
    assert [(d.request_id, d.stop_reason, d.error) for d in result.deltas] == [
        ("x", StopReason.ERROR, "Unsupported tokenizer type: Replace"),
        ("y", StopReason.ERROR, "Unsupported tokenizer type: Replace")]
    assert broken.open == {}  # failed requests are forgotten; the process keeps serving


def expect(router: zmq.Socket, kind: type, timeout_s: float = 30.0):
    """The next message of `kind` from the tokenizer, skipping heartbeats."""
    while router.poll(int(timeout_s * 1000)):
        identity, message = recv_from(router)
        if isinstance(message, kind):
            return identity, message
        assert isinstance(message, Heartbeat), message
    raise AssertionError(f"no {kind.__name__} within {timeout_s} s")


def test_process_serves_a_gateway(demo_model_path, tmp_path):
    ctx = zmq.Context()
    router = make_socket(ctx, zmq.ROUTER, bind=f"ipc://{tmp_path}/tok.sock")
    log = (tmp_path / "tokenizer.log").open("w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "services.tokenizer.main",
            "--gateway-endpoint",
            f"ipc://{tmp_path}/tok.sock",
            "--model-name",
            str(demo_model_path),
            "--name",
            "tok-1",
            "--heartbeat-interval",
            "0.2",
        ],
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        identity, hello = expect(router, TokenizerHello)
        assert (hello.name, hello.pid) == ("tok-1", proc.pid)
        assert expect(router, Heartbeat, 5)[1].sender == "tok-1"

        send_to(router, identity, Tokenize(job_id=1, texts=[TEXT], return_tokens=True))
        result = expect(router, TokenizeResult)[1]
        ids = list(result.results[0].ids)
        assert result.job_id == 1 and result.results[0].tokens[:2] == ["ĠOnce", "Ġupon"]

        # Garbage must be logged and skipped: an unknown kind, a bad body, a wrong frame count.
        router.send_multipart([identity, b"\xff", b"junk"])
        router.send_multipart([identity, bytes([MessageKind.TOKENIZE]), b"\xc1"])
        router.send_multipart([identity, b"only one frame"])

        send_to(router, identity, DetokOpen("r", stream_params(stop_sequences=["little"], include_stop_sequence=False)))
        send_to(router, identity, DetokTokens([DetokItem("r", 0, token_ids(ids))]))
        delta = expect(router, DetokResult)[1].deltas[0]
        assert "".join(delta.texts) == " Once upon a time, there was a " and delta.stop_sequence == "little"

        proc.send_signal(signal.SIGTERM)
        assert expect(router, TokenizerGoodbye, 10)[1].name == "tok-1"
        assert proc.wait(10) == 0
    finally:
        proc.kill()
        proc.wait()
        log.close()
        router.close()
        ctx.term()
    output = (tmp_path / "tokenizer.log").read_text()
    assert "cannot be decoded" in output and "Joined" in output and "Left" in output


def test_process_exits_1_without_a_model(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "services.tokenizer.main", "--model-name", str(tmp_path / "absent")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1 and "Cannot load the tokenizer" in proc.stderr


def test_process_leaves_cleanly_without_a_gateway(demo_model_path, tmp_path):
    """Nobody binds the endpoint: heartbeats queue up, and SIGTERM still ends the process promptly with 0."""
    log_path = tmp_path / "tokenizer.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "services.tokenizer.main",
                "--gateway-endpoint",
                f"ipc://{tmp_path}/nobody.sock",
                "--model-name",
                str(demo_model_path),
                "--heartbeat-interval",
                "0.05",
            ],
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 30
            # Up and trying (nobody will answer, so it never joins): then SIGTERM must still end it promptly.
            while "Connecting to the gateway" not in log_path.read_text() and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.5)  # ten heartbeat intervals: unsendable heartbeats pile up
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(10) == 0
        finally:
            proc.kill()
            proc.wait()
