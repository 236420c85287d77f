"""Start the real pipeline with the launcher for end-to-end tests, and talk gRPC to it."""

from __future__ import annotations

import subprocess
import urllib.request
from pathlib import Path

import grpc

from bench.launch import LaunchedServer, free_port
from services.gateway.pb import generation_pb2_grpc

__all__ = ["Pipeline", "free_port"]


class Pipeline(LaunchedServer):
    """A launcher subprocess serving `model` on free ports (sockets and log in `tmp`), with gRPC stubs."""

    def __init__(self, model: Path, tmp: Path, *extra_args: str, env: dict[str, str] | None = None) -> None:
        super().__init__(str(model), ["--ipc-dir", str(tmp / "ipc"), *extra_args], log_path=tmp / "pipeline.log",
                         host="127.0.0.1", env=env)

    def start(self, timeout: float = 180.0) -> Pipeline:
        super().start(timeout)
        self.launcher_pid = self.process.pid
        self.channel = grpc.insecure_channel(self.address)
        self.stub = generation_pb2_grpc.GenerationServiceStub(self.channel)
        return self

    def stop(self, timeout: float = 20.0) -> int:
        if hasattr(self, "channel"):
            self.channel.close()
        return super().stop(timeout)

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/metrics", timeout=10) as r:
            return r.read().decode()

    def metric(self, name: str) -> float:
        """Value of an unlabelled sample in /metrics."""
        for line in self.metrics().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise KeyError(name)

    def aio_stub(self):
        channel = grpc.aio.insecure_channel(self.address)
        return channel, generation_pb2_grpc.GenerationServiceStub(channel)

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def child_pids(self, name_part: str) -> list[int]:
        """Pids of launcher children whose command line contains `name_part`."""
        out = subprocess.run(["pgrep", "-P", str(self.launcher_pid), "-f", name_part], capture_output=True, text=True)
        return [int(p) for p in out.stdout.split()]
