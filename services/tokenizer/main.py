"""The tokenizer process: joins the tokenizer pool of every gateway over ZeroMQ and serves tokenize/detokenize work.

Two threads: the main thread owns the sockets, one per gateway (receives,
sends each reply back to the gateway that asked, sends heartbeats on time,
joins again after every reconnection; see gateways.py), a work thread does
the tokenizer work.  Tokenizations are served before detokenization work, and
long token details are built in chunks with waiting tokenizations served in
between, so one huge request delays neither the heartbeats nor new requests.
"""

from __future__ import annotations

import collections
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import zmq
from tokenizers import Tokenizer

from services.common import discovery, links
from services.common.codec import ProtocolError, decode, encode
from services.common.gc_freeze import freeze_start_up_objects
from services.common.health import Health, serve_health
from services.common.logs import setup_logging
from services.common.model_path import resolve_model_path
from services.common.protocol import (
    DetokClose,
    DetokDelta,
    DetokItem,
    DetokOpen,
    DetokResult,
    DetokTokens,
    StopReason,
    Tokenize,
)
from services.tokenizer.config import TokenizerConfig
from services.tokenizer.detokenizer import Detokenizer, TextDecoder
from services.tokenizer.encoding import is_encoder_decoder, load_tokenizer, tokenize
from services.tokenizer.gateways import GatewayLink, GatewayLinks, Resolver

logger = logging.getLogger(__name__)

PIECE_CHUNK = 4096  # vocabulary pieces looked up between two looks at waiting tokenizations


class TokenizerService:
    """Answers the gateway's messages; holds the detokenizers of the requests this process owns."""

    def __init__(self, tokenizer: Tokenizer, decoder: TextDecoder) -> None:
        self.tokenizer = tokenizer
        self.decoder = decoder
        self.open: dict[str, Detokenizer] = {}
        # Called between chunks of a long piece lookup, to serve more urgent work meanwhile.
        self.between_chunks: Callable[[], None] = lambda: None

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
            delta.pieces = self._pieces(item.piece_ids)
        except Exception as exc:  # e.g. an unsupported decoder type: fail this request only, keep serving
            logger.exception("Detokenization of %s failed", item.request_id)
            del self.open[item.request_id]
            return DetokDelta(item.request_id, item.first_index, texts=[], stop_reason=StopReason.ERROR,
                              error=str(exc) or type(exc).__name__)
        if detokenizer.finished:
            del self.open[item.request_id]
        return delta


    def _pieces(self, ids) -> list[str]:
        pieces: list[str] = []
        for start in range(0, len(ids), PIECE_CHUNK):
            if start:
                self.between_chunks()
            pieces.extend(self.decoder.piece(token_id) for token_id in ids[start:start + PIECE_CHUNK])
        return pieces


class WorkThread(threading.Thread):
    """Runs `service.handle` off the socket thread; tokenizations jump ahead of detokenization work.

    Detokenization messages keep their order (a request's state depends on it);
    tokenizations are stateless, so they may overtake.  Replies go back to the
    socket thread as encoded frames through an inproc PAIR socket.
    """

    def __init__(self, ctx: zmq.Context, endpoint: str, service: TokenizerService) -> None:
        super().__init__(name="tokenizer-work", daemon=True)
        self.ctx, self.endpoint, self.service = ctx, endpoint, service
        self.urgent: collections.deque = collections.deque()
        self.ordered: collections.deque = collections.deque()
        self.ready = threading.Condition()
        self.stopped = False
        service.between_chunks = self._serve_urgent

    def put(self, key: bytes, message: Any) -> None:
        """Queue `message` from the gateway link `key` (its reply goes back there)."""
        with self.ready:
            (self.urgent if isinstance(message, Tokenize) else self.ordered).append((key, message))
            self.ready.notify()

    def stop(self) -> None:
        with self.ready:
            self.stopped = True
            self.ready.notify()
        self.join(timeout=5.0)

    def run(self) -> None:
        self.out = self.ctx.socket(zmq.PAIR)
        self.out.connect(self.endpoint)
        try:
            while True:
                with self.ready:
                    self.ready.wait_for(lambda: self.stopped or self.urgent or self.ordered)
                    if self.stopped:
                        return
                    queue = self.urgent if self.urgent else self.ordered
                    key, message = queue.popleft()
                self._handle(key, message)
        finally:
            self.out.close(linger=0)

    def _serve_urgent(self) -> None:
        while True:
            with self.ready:
                if not self.urgent:
                    return
                key, message = self.urgent.popleft()
            self._handle(key, message)

    def _handle(self, key: bytes, message: Any) -> None:
        try:
            reply = self.service.handle(message)
        except Exception:  # one message's failure must not stop this process serving the others
            logger.exception("Failed to handle a %s message", type(message).__name__)
            return
        if reply is not None:
            self.out.send_multipart([key, *encode(reply)], copy=False)


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


def serve(config: TokenizerConfig, name: str, service: TokenizerService, stopper: _Stopper, health: Health) -> None:
    """Serve every gateway found (joining each anew after every reconnection) until a signal asks to stop."""
    ctx = zmq.Context()
    gateways = GatewayLinks(ctx, config.gateway_endpoint, name)
    replies = ctx.socket(zmq.PAIR)
    replies.bind(f"inproc://tokenizer-replies-{id(replies)}")
    worker = WorkThread(ctx, replies.get_string(zmq.LAST_ENDPOINT), service)
    worker.start()
    gateways.refresh(discovery.resolve(config.gateway_endpoint))
    resolver = Resolver(config.gateway_endpoint, links.settings().discovery_interval)
    resolver.start()
    next_heartbeat = time.monotonic() + config.heartbeat_interval
    freeze_start_up_objects()
    health.ready()
    try:
        while not stopper.stopping:
            health.turn()  # the poll below waits at most one heartbeat interval
            if (found := resolver.take()) is not None:
                gateways.refresh(found)
            poller = zmq.Poller()
            for polled in (stopper.wake, replies, *gateways.pollables()):
                poller.register(polled, zmq.POLLIN)
            timeout_ms = max(0.0, next_heartbeat - time.monotonic()) * 1000
            for polled, _ in poller.poll(timeout_ms):
                if polled is stopper.wake:
                    stopper.wake.recv(512)  # the signal's wake-up byte has done its job
                elif polled is not replies and (link := gateways.link_of(polled)) is not None:
                    if polled is link.events:
                        gateways.on_events(link)
                    else:
                        _receive_one(link, worker)
            while replies.poll(0):
                key, *frames = replies.recv_multipart()
                gateways.reply(key, frames)
            if time.monotonic() >= next_heartbeat:
                gateways.heartbeat()
                next_heartbeat = time.monotonic() + config.heartbeat_interval
    finally:
        resolver.stop()
        gateways.close()
        worker.stop()
        replies.close(linger=0)
        links.stop_authenticators()
        ctx.term()


def _receive_one(link: GatewayLink, worker: WorkThread) -> None:
    try:
        message = decode(link.sock.recv_multipart())
    except ProtocolError as exc:  # garbage from the wire must never take the process down
        logger.error("Skipping a message from %s that cannot be decoded: %s", link.endpoint, exc)
        return
    worker.put(link.key, message)


def main(argv: list[str] | None = None) -> int:
    """Console script `text-generation-tokenizer`."""
    setup_logging("tokenizer")
    config = links.parse_with_links(TokenizerConfig, argv, "Tokenizer process of the TGIS-compatible pipeline")
    stopper = _Stopper()
    name = config.name or f"{socket.gethostname()}-{os.getpid()}"
    health = Health(config.health_stall_timeout)
    health.not_ready("loading the tokenizer")
    serve_health(health, config.health_port)
    try:
        model_dir = resolve_model_path(config.model_name, config.revision)
        tokenizer = load_tokenizer(model_dir)
        decoder = TextDecoder(tokenizer, seq2seq=is_encoder_decoder(model_dir))
    except Exception as exc:
        logger.error("Cannot load the tokenizer of %s: %s", config.model_name, exc)
        return 1
    if not stopper.stopping:
        serve(config, name, TokenizerService(tokenizer, decoder), stopper, health)
    return 0


if __name__ == "__main__":
    sys.exit(main())
