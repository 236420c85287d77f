"""Peer discovery: a comma-separated endpoint list where a tcp host name stands for every address it resolves to.

A Kubernetes headless Service (or a scaled compose service) answers one A
record per pod, so `tcp://gateway-pool:5570` names every gateway; resolving it
again every `DISCOVERY_INTERVAL_S` finds the ones added since and drops the
ones gone.  ipc endpoints and literal addresses are taken as they are.
"""

from __future__ import annotations

import ipaddress
import logging
import socket

log = logging.getLogger(__name__)


def split(endpoints: str) -> list[str]:
    """The non-empty items of a comma-separated endpoint list, in order, without repeats."""
    return list(dict.fromkeys(e.strip() for e in endpoints.split(",") if e.strip()))


def _host_port(endpoint: str) -> tuple[str, str] | None:
    if not endpoint.startswith("tcp://"):
        return None
    host, sep, port = endpoint[len("tcp://"):].rpartition(":")
    return (host, port) if sep and host and not host.startswith("[") else None


def _is_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return host == "*"
    return True


def resolve(endpoints: str) -> list[str]:
    """Every endpoint of the list, tcp host names replaced by one endpoint per IPv4 address (sorted).

    A name that does not resolve (yet) contributes nothing: the next
    resolution may find it, e.g. once the first pod of a Service is up.
    """
    found: list[str] = []
    for endpoint in split(endpoints):
        parts = _host_port(endpoint)
        if parts is None or _is_literal(parts[0]):
            found.append(endpoint)
            continue
        host, port = parts
        try:
            infos = socket.getaddrinfo(host, int(port), socket.AF_INET, socket.SOCK_STREAM)
        except (OSError, ValueError) as exc:
            log.debug("cannot resolve %s yet: %s", endpoint, exc)
            continue
        found.extend(f"tcp://{address}:{port}" for address in sorted({info[4][0] for info in infos}))
    return list(dict.fromkeys(found))
