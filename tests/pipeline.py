"""Start the real pipeline with the launcher for end-to-end tests, and talk gRPC to it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc

from services.gateway.pb import generation_pb2_grpc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Pipeline:
    """A launcher subprocess serving `model` on free ports, with sync and async stubs."""

    def __init__(self, model: Path, tmp: Path, *extra_args: str, env: dict[str, str] | None = None) -> None:
        self.grpc_port, self.http_port = free_port(), free_port()
        self.log_path = tmp / "pipeline.log"
        self.args = [
            sys.executable, "-m", "services.launcher", "--model-name", str(model),
            "--port", str(self.http_port), "--grpc-port", str(self.grpc_port), "--ipc-dir", str(tmp / "ipc"),
            *extra_args,
        ]
        self.env = {**os.environ, "LOG_LEVEL": "INFO", **(env or {})}
        self.process: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def start(self, timeout: float = 180.0) -> Pipeline:
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(self.args, env=self.env, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"launcher exited with {self.process.returncode}:\n{self.logs()}")
            if self.health()[0] == 200:
                self.channel = grpc.insecure_channel(self.address)
                self.stub = generation_pb2_grpc.GenerationServiceStub(self.channel)
                return self
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"pipeline not healthy after {timeout} s:\n{self.logs()}")

    def health(self) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/health", timeout=60) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()
        except OSError:
            return 0, ""

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

    def stop(self, timeout: float = 20.0) -> int:
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        self._log.close()
        if hasattr(self, "channel"):
            self.channel.close()
        return code

    def child_pids(self, name_part: str) -> list[int]:
        """Pids of launcher children whose command line contains `name_part`."""
        out = subprocess.run(["pgrep", "-P", str(self.process.pid), "-f", name_part], capture_output=True, text=True)
        return [int(p) for p in out.stdout.split()]
