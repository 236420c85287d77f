"""Settings of every ZeroMQ link between services: heartbeats, CurveZMQ keys, address re-resolution.

Every service parses `LinkConfig` beside its own config (`parse_with_links`)
and `make_socket` (zmq_io.py) applies it to each socket it creates:

* **Heartbeats** (`ZMQ_HEARTBEAT_IVL`/`TIMEOUT`/`TTL`) on every tcp socket:
  a peer whose process stops answering (lost node, SIGSTOP, a half-open
  connection) is disconnected within interval + timeout.  Not on ipc: both
  ends share a machine, the kernel closes a dead process's connections, and
  the services' own heartbeats and pings see a frozen one.
* **CurveZMQ** (optional, tcp; ipc only with `CURVE_IPC`): the side that binds
  is the curve server with `server.key_secret`, the side that connects is a
  client with `client.key_secret` that trusts `server.key`.  A ZAP handler on
  every binding process admits only the public key of `client.key`; anyone
  else is refused at the handshake and logged.  `text-generation-server
  generate-curve-keys DIR` writes the four files.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from services.common.config import add_config_arguments, config_from_namespace, knob

log = logging.getLogger(__name__)
T = TypeVar("T")

SERVER_KEY = "server"
CLIENT_KEY = "client"


@dataclass(frozen=True)
class LinkConfig:
    zmq_heartbeat_interval: float = knob(1.0, "ZMQ_HEARTBEAT_INTERVAL_S", "seconds between ZMQ heartbeats on every tcp link (0: off)")
    zmq_heartbeat_timeout: float = knob(5.0, "ZMQ_HEARTBEAT_TIMEOUT_S", "seconds without any traffic after which a tcp link's peer is dropped")
    curve_keys_dir: str | None = knob(None, "CURVE_KEYS_DIR", "folder with CurveZMQ keys (server.key[_secret], client.key[_secret]): encrypt and authenticate tcp links")
    curve_ipc: bool = knob(False, "CURVE_IPC", "use CurveZMQ on ipc links too (tcp only by default)")
    discovery_interval: float = knob(10.0, "DISCOVERY_INTERVAL_S", "seconds between re-resolutions of peer host names (one link per address)")

    @property
    def heartbeat_bound(self) -> float:
        """Longest time a silent peer keeps its link: the next heartbeat goes out, then its answer times out."""
        return self.zmq_heartbeat_interval + self.zmq_heartbeat_timeout


@dataclass(frozen=True)
class CurveKeys:
    server_public: bytes
    server_secret: bytes | None  # only the processes that bind need it
    client_public: bytes
    client_secret: bytes


_settings = LinkConfig()
_keys: CurveKeys | None = None
_authenticators: dict[int, ThreadAuthenticator] = {}


def configure(settings: LinkConfig) -> None:
    """Use `settings` for every socket made from now on (called once at start-up)."""
    global _settings, _keys
    _settings = settings
    _keys = load_keys(settings.curve_keys_dir) if settings.curve_keys_dir else None


def settings() -> LinkConfig:
    return _settings


def load_keys(folder: str) -> CurveKeys:
    """The curve keys of `folder`; a missing or unreadable file is an error at start-up."""
    base = Path(folder)
    try:
        server_public, server_secret = zmq.auth.load_certificate(base / f"{SERVER_KEY}.key_secret")
    except (OSError, ValueError):
        try:
            server_public, server_secret = zmq.auth.load_certificate(base / f"{SERVER_KEY}.key")
        except (OSError, ValueError) as exc:
            raise SystemExit(f"CURVE_KEYS_DIR {folder}: cannot read {SERVER_KEY}.key: {exc}") from exc
    try:
        client_public, client_secret = zmq.auth.load_certificate(base / f"{CLIENT_KEY}.key_secret")
    except (OSError, ValueError) as exc:
        raise SystemExit(f"CURVE_KEYS_DIR {folder}: cannot read {CLIENT_KEY}.key_secret: {exc}") from exc
    if client_secret is None:
        raise SystemExit(f"CURVE_KEYS_DIR {folder}: {CLIENT_KEY}.key_secret holds no secret key")
    return CurveKeys(server_public, server_secret, client_public, client_secret)


def generate_keys(folder: str) -> list[Path]:
    """Write a fresh server and client key pair into `folder` (created); returns the files written."""
    base = Path(folder)
    base.mkdir(parents=True, exist_ok=True)
    written = []
    for name in (SERVER_KEY, CLIENT_KEY):
        for suffix in (".key", ".key_secret"):
            (base / f"{name}{suffix}").unlink(missing_ok=True)
        public, secret = zmq.auth.create_certificates(base, name)
        Path(secret).chmod(0o600)
        written += [Path(public), Path(secret)]
    return written


def _uses_curve(endpoint: str) -> bool:
    return _keys is not None and (endpoint.startswith("tcp://") or (_settings.curve_ipc and endpoint.startswith("ipc://")))


def prepare(sock: zmq.Socket, *, bind: str | None = None, connect: str | None = None) -> None:
    """Set heartbeat and curve options on `sock` before it binds or connects to `endpoint`."""
    endpoint = bind or connect or ""
    if endpoint.startswith("tcp://") and _settings.zmq_heartbeat_interval > 0:
        sock.setsockopt(zmq.HEARTBEAT_IVL, int(_settings.zmq_heartbeat_interval * 1000))
        timeout_ms = int(_settings.zmq_heartbeat_timeout * 1000)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, timeout_ms)
        # What the peer is told to wait for us (in units of 100 ms).
        sock.setsockopt(zmq.HEARTBEAT_TTL, max(100, timeout_ms // 100 * 100))
    if not _uses_curve(endpoint):
        return
    assert _keys is not None
    if bind:
        if _keys.server_secret is None:
            raise SystemExit(f"{bind}: CURVE_KEYS_DIR has no server.key_secret, which a binding service needs")
        _start_authenticator(sock.context)
        sock.curve_server = True
        sock.curve_publickey = _keys.server_public
        sock.curve_secretkey = _keys.server_secret
    else:
        sock.curve_serverkey = _keys.server_public
        sock.curve_publickey = _keys.client_public
        sock.curve_secretkey = _keys.client_secret


class _AllowedClients:
    """ZAP callback: admits the client key, logs everyone else (a misconfigured or foreign peer)."""

    def __init__(self, allowed: bytes) -> None:
        self.allowed = allowed

    def callback(self, _domain: str, client_key: bytes) -> bool:
        if client_key == self.allowed:
            return True
        log.warning("refused a connection with an unknown CurveZMQ client key %s", client_key.decode(errors="replace"))
        return False


def _start_authenticator(ctx: zmq.Context) -> None:
    """One ZAP handler per context: every binding curve socket of the process asks it about each client."""
    key = ctx.underlying
    if key in _authenticators:
        return
    assert _keys is not None
    # A plain context over the same libzmq context: the handler thread must not use asyncio sockets.
    auth = ThreadAuthenticator(zmq.Context.shadow(key))
    auth.start()
    auth.configure_curve_callback("*", credentials_provider=_AllowedClients(_keys.client_public))  # both z85
    _authenticators[key] = auth


def stop_authenticators() -> None:
    """Stop the ZAP handlers (their sockets would keep the contexts from terminating)."""
    while _authenticators:
        _, auth = _authenticators.popitem()
        auth.stop()


def parse_with_links(cls: type[T], argv: list[str] | None, description: str) -> T:
    """`parse_config` for a service config plus the link knobs, which are applied at once (`configure`)."""
    parser = argparse.ArgumentParser(description=description)
    add_config_arguments(parser, cls)
    add_config_arguments(parser, LinkConfig)
    namespace = parser.parse_args(argv)
    configure(config_from_namespace(LinkConfig, namespace))
    return config_from_namespace(cls, namespace)


def as_env(settings: LinkConfig) -> dict[str, str]:
    """The env vars that pass `settings` on to child processes (the launcher)."""
    env = {}
    for f in dataclasses.fields(LinkConfig):
        value = getattr(settings, f.name)
        if value is not None:
            env[f.metadata["env"]] = str(value).lower() if isinstance(value, bool) else str(value)
    return env
