"""Tiny typed helpers over ZeroMQ sockets: send and receive protocol messages.

ROUTER sockets carry the peer identity as an extra first frame; these helpers
hide it behind `(identity, message)` pairs.  The async variants work on
`zmq.asyncio` sockets.  Every socket gets the link settings of `links.py`
(heartbeats, CurveZMQ) before it binds or connects.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import zmq
import zmq.asyncio

from services.common import links
from services.common.codec import decode, encode

_log = logging.getLogger(__name__)


def make_socket(ctx: zmq.Context, kind: int, *, bind: str | None = None, connect: str | None = None) -> zmq.Socket:
    """Create a socket that drops unsent messages at close (linger 0) so shutdowns never hang."""
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    if kind == zmq.ROUTER:
        # Report unroutable peers instead of silently dropping their replies.
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    links.prepare(sock, bind=bind, connect=connect)
    if bind:
        sock.bind(bind)
    if connect:
        sock.connect(connect)
    return sock


def send(sock: zmq.Socket, message: Any) -> None:
    sock.send_multipart(encode(message), copy=False)


def recv(sock: zmq.Socket) -> Any:
    return decode(sock.recv_multipart())


def send_to(sock: zmq.Socket, identity: bytes, message: Any) -> None:
    sock.send_multipart([identity, *encode(message)], copy=False)


def recv_from(sock: zmq.Socket) -> tuple[bytes, Any]:
    identity, *frames = sock.recv_multipart()
    return identity, decode(frames)


def recv_from_with_fd(sock: zmq.Socket) -> tuple[bytes, int, Any]:
    """`recv_from`, plus the file descriptor of the connection it came on (-1 if unknown), for disconnect events."""
    identity, *frames = sock.recv_multipart(copy=False)
    fd = frames[-1].get(zmq.SRCFD) if frames else -1
    return identity.bytes, fd, decode([frame.bytes for frame in frames])


async def async_send(sock: zmq.asyncio.Socket, message: Any) -> None:
    await sock.send_multipart(encode(message), copy=False)


async def async_recv(sock: zmq.asyncio.Socket) -> Any:
    return decode(await sock.recv_multipart())


async def async_send_to(sock: zmq.asyncio.Socket, identity: bytes, message: Any) -> None:
    await sock.send_multipart([identity, *encode(message)], copy=False)


async def async_recv_from(sock: zmq.asyncio.Socket) -> tuple[bytes, Any]:
    identity, *frames = await sock.recv_multipart()
    return identity, decode(frames)


def send_to_nowait(sock: zmq.asyncio.Socket, identity: bytes | None, message: Any, what: str = "peer",
                   on_error: Callable[[BaseException], None] | None = None) -> None:
    """Queue a message on an asyncio socket from synchronous code, keeping send order; failures are logged
    (and passed to `on_error`, e.g. to drop a peer whose connection is gone)."""
    frames = encode(message) if identity is None else [identity, *encode(message)]
    future = sock.send_multipart(frames, copy=False)

    def report(done) -> None:
        if not done.cancelled() and done.exception() is not None:
            _log.warning("could not send %s to %s: %s", type(message).__name__, what, done.exception())
            if on_error is not None:
                on_error(done.exception())

    future.add_done_callback(report)
