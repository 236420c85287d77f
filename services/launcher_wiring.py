"""Addresses of the launcher's children: which sockets each replica and gateway binds, and who connects where.

Over ipc the sockets live in the launcher's folder; over tcp (`--internal-
transport tcp`) they are loopback ports picked when the launcher starts, to
try the multi-host topology on one machine.  The first gateway and replica
keep the names a single pipeline has (`tokenizers.sock`, `scheduler.sock`).
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from pathlib import Path


def free_port() -> int:
    """A loopback port free now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def suffix(i: int) -> str:
    return "" if i == 0 else f"-{i}"


@dataclass
class Wiring:
    transport: str  # ipc or tcp
    ipc_dir: Path
    num_gateways: int
    num_replicas: int
    grpc_port: int
    port: int
    master_port: int
    _ports: dict[str, int] = field(default_factory=dict)

    def endpoint(self, name: str) -> str:
        if self.transport == "tcp":
            if name not in self._ports:
                self._ports[name] = free_port()
            return f"tcp://127.0.0.1:{self._ports[name]}"
        return f"ipc://{self.ipc_dir / name}.sock"

    def tokenizer_env(self) -> str:
        """Every tokenizer serves every gateway."""
        return ",".join(self.endpoint(f"tokenizers{suffix(g)}") for g in range(self.num_gateways))

    def replica_env(self, r: int) -> dict[str, str]:
        s = suffix(r)
        return {"SCHEDULER_ENDPOINT": self.endpoint(f"scheduler{s}"), "WORKER_STEP_ENDPOINT": self.endpoint(f"steps{s}"),
                "WORKER_RESULT_ENDPOINT": self.endpoint(f"results{s}"),
                # Each replica's ranks rendezvous on their own port.
                "MASTER_PORT": str(self.master_port + r * 10)}

    def gateway_env(self, g: int) -> dict[str, str]:
        """Gateway g binds its own pool and ports and routes over every replica."""
        return {"TOKENIZER_ENDPOINT": self.endpoint(f"tokenizers{suffix(g)}"),
                "SCHEDULER_ENDPOINT": ",".join(self.endpoint(f"scheduler{suffix(r)}") for r in range(self.num_replicas)),
                "GRPC_PORT": str(self.grpc_port + g), "PORT": str(self.port + g)}
