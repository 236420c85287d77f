"""Start the real pipeline with the launcher for end-to-end tests, and talk gRPC to it."""

from __future__ import annotations

import subprocess
import urllib.request
from pathlib import Path

import grpc

from bench.launch import LaunchedServer, free_port
from services.gateway.pb import generation_pb2 as pb
from services.gateway.pb import generation_pb2_grpc

__all__ = ["Pipeline", "free_port", "greedy_call"]


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


async def greedy_call(stub, prompt: str, max_new: int, stream: bool, timeout: float) -> tuple[str, int, int]:
    """(text, generated tokens, stop reason) of one greedy call, streamed (texts joined) or unary."""
    params = pb.Parameters(stopping=pb.StoppingCriteria(max_new_tokens=max_new))
    if stream:
        messages = [m async for m in stub.GenerateStream(pb.SingleGenerationRequest(
            request=pb.GenerationRequest(text=prompt), params=params), timeout=timeout)]
        return "".join(m.text for m in messages), messages[-1].generated_token_count, messages[-1].stop_reason
    r = (await stub.Generate(pb.BatchedGenerationRequest(
        requests=[pb.GenerationRequest(text=prompt)], params=params), timeout=timeout)).responses[0]
    return r.text, r.generated_token_count, r.stop_reason
