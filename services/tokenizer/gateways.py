"""The tokenizer's links to every gateway: one DEALER per gateway address, joined anew after each reconnection.

A tokenizer serves every gateway it finds (`TOKENIZER_ENDPOINT`: a list, and
host names re-resolved every `DISCOVERY_INTERVAL_S`, so a headless Service
names every gateway pod).  One DEALER per gateway, not one DEALER connected
to all of them, because a DEALER round-robins what it sends over its peers:
each reply must go back on the link its request came in on.  A gateway knows
its members by connection, so each new connection says `TokenizerHello`
again; ZMQ heartbeats close a link whose gateway stopped answering.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
from collections.abc import Iterator

import zmq
from zmq.utils.monitor import recv_monitor_message

from services.common import discovery, links
from services.common.codec import encode
from services.common.protocol import Heartbeat, TokenizerGoodbye, TokenizerHello
from services.common.zmq_io import make_socket

log = logging.getLogger(__name__)

GOODBYE_LINGER_MS = 1000  # how long a goodbye may wait for a slow or absent gateway


class GatewayLink:
    """One gateway: the DEALER connected to it, its connection events, whether it is connected now."""

    def __init__(self, ctx: zmq.Context, endpoint: str, key: bytes) -> None:
        self.endpoint, self.key = endpoint, key
        self.sock = make_socket(ctx, zmq.DEALER)
        # Watch before connecting: a connection made before the monitor exists would never say hello.
        self.events = self.sock.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        links.prepare(self.sock, connect=endpoint)
        self.sock.connect(endpoint)
        self.connected = False

    def send(self, frames: list, what: str) -> None:
        """Send without blocking: a gateway gone long enough to fill the queue must not freeze this process."""
        try:
            self.sock.send_multipart(frames, zmq.NOBLOCK, copy=False)
        except zmq.Again:
            log.warning("Gateway at %s unreachable (send queue full), dropped a %s message", self.endpoint, what)

    def close(self, linger_ms: int) -> None:
        self.sock.disable_monitor()
        self.events.close(linger=0)
        self.sock.close(linger=linger_ms)


class Resolver(threading.Thread):
    """Looks the endpoint list up every `interval` seconds off the socket thread: DNS may answer slowly,
    and the socket thread must keep its heartbeats on time."""

    def __init__(self, endpoints: str, interval: float) -> None:
        super().__init__(name="tokenizer-discovery", daemon=True)
        self.endpoints, self.interval = endpoints, interval
        self._found: list[str] | None = None
        self._lock = threading.Lock()
        self._stopped = threading.Event()

    def run(self) -> None:
        while not self._stopped.wait(self.interval):
            found = discovery.resolve(self.endpoints)
            with self._lock:
                self._found = found

    def take(self) -> list[str] | None:
        """The latest look-up not taken yet, or None."""
        with self._lock:
            found, self._found = self._found, None
        return found

    def stop(self) -> None:
        self._stopped.set()


class GatewayLinks:
    """Every gateway this tokenizer serves, found from the endpoint list and kept in step with it."""

    def __init__(self, ctx: zmq.Context, endpoints: str, name: str) -> None:
        self.ctx, self.endpoints, self.name = ctx, endpoints, name
        self.links: dict[bytes, GatewayLink] = {}
        self._by_endpoint: dict[str, GatewayLink] = {}
        self._next_key = 0

    def refresh(self, wanted: list[str]) -> None:
        """Connect to gateways that appeared in the list (or in DNS), leave those that are gone."""
        for endpoint in wanted:
            if endpoint not in self._by_endpoint:
                self._next_key += 1
                link = GatewayLink(self.ctx, endpoint, struct.pack("!I", self._next_key))
                self.links[link.key] = self._by_endpoint[endpoint] = link
                log.info("Connecting to the gateway at %s", endpoint)
        for endpoint in [e for e in self._by_endpoint if e not in wanted]:
            link = self._by_endpoint.pop(endpoint)
            del self.links[link.key]
            if link.connected:
                self._send(link, TokenizerGoodbye(name=self.name))
            link.close(GOODBYE_LINGER_MS)
            log.info("Left the gateway at %s (no longer in %s)", endpoint, self.endpoints)

    def pollables(self) -> Iterator[zmq.Socket]:
        for link in self.links.values():
            yield link.sock
            yield link.events

    def on_events(self, link: GatewayLink) -> None:
        """Connection events of one link: say hello on each new connection, note each lost one."""
        while link.events.poll(0):
            event = recv_monitor_message(link.events)
            if event["event"] == zmq.EVENT_CONNECTED:
                link.connected = True
                self._send(link, TokenizerHello(name=self.name, pid=os.getpid()))
                log.info("Joined the tokenizer pool at %s as %s", link.endpoint, self.name)
            elif event["event"] == zmq.EVENT_DISCONNECTED and link.connected:
                link.connected = False
                log.warning("Lost the gateway at %s (closed, or silent for up to %.1f s); reconnecting",
                            link.endpoint, links.settings().heartbeat_bound)

    def link_of(self, sock: zmq.Socket) -> GatewayLink | None:
        return next((link for link in self.links.values() if sock is link.sock or sock is link.events), None)

    def reply(self, key: bytes, frames: list) -> None:
        """A reply goes back to the gateway that asked; if its link is down, that gateway re-sends the work."""
        link = self.links.get(key)
        if link is not None and link.connected:
            link.send(frames, "reply")

    def heartbeat(self) -> None:
        for link in self.links.values():
            if link.connected:
                self._send(link, Heartbeat(sender=self.name))

    def close(self) -> None:
        """Say goodbye to every connected gateway (each moves our work elsewhere) and close."""
        for link in self.links.values():
            if link.connected:
                self._send(link, TokenizerGoodbye(name=self.name))
                log.info("Left the tokenizer pool at %s", link.endpoint)
        for link in self.links.values():
            link.close(GOODBYE_LINGER_MS)
        self.links.clear()
        self._by_endpoint.clear()

    def _send(self, link: GatewayLink, message: object) -> None:
        link.send(encode(message), type(message).__name__)
