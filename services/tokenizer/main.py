"""The tokenizer process: joins the gateway's tokenizer pool over ZeroMQ and serves tokenize/detokenize work."""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import time
from typing import Any

import zmq
from tokenizers import Tokenizer

from services.common.codec import encode
from services.common.config import parse_config
from services.common.logs import setup_logging
from services.common.model_path import resolve_model_path
from services.common.protocol import (
    DetokClose,
    DetokDelta,
    DetokItem,
    DetokOpen,
    DetokResult,
    DetokTokens,
    Heartbeat,
    StopReason,
    Tokenize,
    TokenizerGoodbye,
    TokenizerHello,
)
from services.common.zmq_io import make_socket, recv
from services.tokenizer.config import TokenizerConfig
from services.tokenizer.detokenizer import Detokenizer, TextDecoder
from services.tokenizer.encoding import is_encoder_decoder, load_tokenizer, tokenize

logger = logging.getLogger(__name__)

GOODBYE_LINGER_MS = 1000  # how long the goodbye may wait for a slow or absent gateway


class TokenizerService:
    """Answers the gateway's messages; holds the detokenizers of the requests this process owns."""

    def __init__(self, tokenizer: Tokenizer, decoder: TextDecoder) -> None:
        self.tokenizer = tokenizer
        self.decoder = decoder
        self.open: dict[str, Detokenizer] = {}

    def handle(self, message: Any) -> Any | None:
        """The reply to `message`, or None when it needs none."""
        match message:
            case Tokenize():
                return tokenize(self.tokenizer, message)
            case DetokOpen():
                detokenizer = Detokenizer(self.decoder, message.request_id, message.params)
                # Open before replaying: should the replay fail, the request's next tokens report the error.
                self.open[message.request_id] = detokenizer
                # The lost process already released these ids' text; decoding them again restores its state.
                detokenizer.feed(message.replay_ids, 0, StopReason.NOT_FINISHED)
            case DetokTokens():
                return self._detokenize(message)
            case DetokClose():
                for request_id in message.request_ids:
                    self.open.pop(request_id, None)
            case _:
                logger.warning("Ignoring unexpected %s message", type(message).__name__)
        return None

    def _detokenize(self, message: DetokTokens) -> DetokResult:
        return DetokResult([self._detokenize_item(item) for item in message.items])

    def _detokenize_item(self, item: DetokItem) -> DetokDelta:
        detokenizer = self.open.get(item.request_id)
        if detokenizer is None:  # closed or finished: the gateway ignores this
            return DetokDelta(item.request_id, item.first_index, texts=[])
        try:
            delta = detokenizer.feed(item.ids, item.first_index, item.stop_reason)
            delta.pieces = [self.decoder.piece(token_id) for token_id in item.piece_ids]
        except Exception as exc:  # e.g. an unsupported decoder type: fail this request only, keep serving
            logger.exception("Detokenization of %s failed", item.request_id)
            del self.open[item.request_id]
            return DetokDelta(item.request_id, item.first_index, texts=[], stop_reason=StopReason.ERROR,
                              error=str(exc) or type(exc).__name__)
        if detokenizer.finished:
            del self.open[item.request_id]
        return delta


class _Stopper:
    """Turns SIGTERM/SIGINT into a flag, and wakes a blocked poll through a socket pair."""

    def __init__(self) -> None:
        self.stopping = False
        self.wake, self._wake_writer = socket.socketpair()
        self._wake_writer.setblocking(False)
        signal.set_wakeup_fd(self._wake_writer.fileno())
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, _frame: Any) -> None:
        logger.info("Received %s, leaving the pool", signal.Signals(signum).name)
        self.stopping = True


def serve(config: TokenizerConfig, name: str, service: TokenizerService, stopper: _Stopper) -> None:
    """Join the gateway's pool and answer its messages until a signal asks to stop."""
    ctx = zmq.Context()
    sock = make_socket(ctx, zmq.DEALER, connect=config.gateway_endpoint)
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    poller.register(stopper.wake, zmq.POLLIN)
    _send(sock, TokenizerHello(name=name, pid=os.getpid()))
    logger.info("Joined the tokenizer pool at %s as %s", config.gateway_endpoint, name)
    next_heartbeat = time.monotonic() + config.heartbeat_interval
    try:
        while not stopper.stopping:
            timeout_ms = max(0.0, next_heartbeat - time.monotonic()) * 1000
            events = dict(poller.poll(timeout_ms))
            if stopper.wake in events:
                stopper.wake.recv(512)  # the signal's wake-up byte has done its job
            if sock in events:
                _serve_one(sock, service)
            if time.monotonic() >= next_heartbeat:
                _send(sock, Heartbeat(sender=name))
                next_heartbeat = time.monotonic() + config.heartbeat_interval
        _send(sock, TokenizerGoodbye(name=name))
        logger.info("Left the tokenizer pool at %s", config.gateway_endpoint)
    finally:
        sock.close(linger=GOODBYE_LINGER_MS)
        ctx.term()


def _send(sock: zmq.Socket, message: Any) -> None:
    """Send without blocking: a gateway gone long enough to fill the queue must not freeze this process."""
    try:
        sock.send_multipart(encode(message), zmq.NOBLOCK, copy=False)
    except zmq.Again:
        logger.warning("Gateway unreachable (send queue full), dropped a %s message", type(message).__name__)


def _serve_one(sock: zmq.Socket, service: TokenizerService) -> None:
    try:
        message = recv(sock)
    except Exception as exc:  # garbage from the wire must never take the process down
        logger.error("Skipping a message that cannot be decoded: %s", exc)
        return
    try:
        reply = service.handle(message)
        if reply is not None:
            _send(sock, reply)
    except Exception:
        logger.exception("Failed to handle a %s message", type(message).__name__)


def main(argv: list[str] | None = None) -> int:
    """Console script `text-generation-tokenizer`."""
    setup_logging("tokenizer")
    config = parse_config(TokenizerConfig, argv, "Tokenizer process of the TGIS-compatible pipeline")
    stopper = _Stopper()
    name = config.name or f"{socket.gethostname()}-{os.getpid()}"
    try:
        model_dir = resolve_model_path(config.model_name, config.revision)
        tokenizer = load_tokenizer(model_dir)
        decoder = TextDecoder(tokenizer, seq2seq=is_encoder_decoder(model_dir))
    except Exception as exc:
        logger.error("Cannot load the tokenizer of %s: %s", config.model_name, exc)
        return 1
    if not stopper.stopping:
        serve(config, name, TokenizerService(tokenizer, decoder), stopper)
    return 0


if __name__ == "__main__":
    sys.exit(main())
