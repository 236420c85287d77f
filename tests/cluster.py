"""Start the services' own console scripts as independent processes over tcp (no launcher), for topology tests."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from bench.launch import free_port, launcher_env
from services.gateway.pb import generation_pb2_grpc

BIN = Path(sys.executable).parent


def tcp(port: int) -> str:
    return f"tcp://127.0.0.1:{port}"


@dataclass
class Proc:
    name: str
    process: subprocess.Popen
    log_path: Path

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def signal(self, signum: int) -> None:
        if self.alive:
            os.kill(self.process.pid, signum)


@dataclass
class Replica:
    """Ports of one model replica: the scheduler's three sockets."""

    gateways: int = field(default_factory=free_port)
    steps: int = field(default_factory=free_port)
    results: int = field(default_factory=free_port)


@dataclass
class GatewayPorts:
    grpc: int = field(default_factory=free_port)
    http: int = field(default_factory=free_port)
    pool: int = field(default_factory=free_port)


class Cluster:
    """Processes started from the console scripts, each with its own log in `tmp`; `stop()` ends them all."""

    def __init__(self, tmp: Path, env: dict[str, str]) -> None:
        self.tmp = tmp
        self.env = {**launcher_env(), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **env}
        self.procs: dict[str, Proc] = {}
        self.channels: list[grpc.Channel] = []

    def start(self, name: str, script: str, env: dict[str, str]) -> Proc:
        log_path = self.tmp / f"{name}.log"
        with open(log_path, "ab") as log:
            process = subprocess.Popen([str(BIN / script)], env={**self.env, **env}, stdout=log,
                                       stderr=subprocess.STDOUT)
        self.procs[name] = Proc(name, process, log_path)
        return self.procs[name]

    def scheduler(self, name: str, ports: Replica, **env: str) -> Proc:
        return self.start(name, "text-generation-scheduler", {
            "SCHEDULER_ENDPOINT": tcp(ports.gateways), "WORKER_STEP_ENDPOINT": tcp(ports.steps),
            "WORKER_RESULT_ENDPOINT": tcp(ports.results), **env})

    def worker(self, name: str, ports: Replica, **env: str) -> Proc:
        return self.start(name, "text-generation-worker", {
            "WORKER_STEP_ENDPOINT": tcp(ports.steps), "WORKER_RESULT_ENDPOINT": tcp(ports.results),
            "WORKER_DEVICE": "cpu", "OMP_NUM_THREADS": "1", **env})

    def gateway(self, name: str, ports: GatewayPorts, schedulers: list[Replica], **env: str) -> Proc:
        return self.start(name, "text-generation-gateway", {
            "GRPC_PORT": str(ports.grpc), "PORT": str(ports.http), "GATEWAY_HOST": "127.0.0.1",
            "TOKENIZER_ENDPOINT": tcp(ports.pool),
            "SCHEDULER_ENDPOINT": ",".join(tcp(r.gateways) for r in schedulers), **env})

    def tokenizer(self, name: str, gateways: list[GatewayPorts], **env: str) -> Proc:
        return self.start(name, "text-generation-tokenizer", {
            "TOKENIZER_NAME": name, "TOKENIZER_ENDPOINT": ",".join(tcp(g.pool) for g in gateways), **env})

    def stub(self, ports: GatewayPorts):
        channel = grpc.insecure_channel(f"127.0.0.1:{ports.grpc}")
        self.channels.append(channel)
        return generation_pb2_grpc.GenerationServiceStub(channel)

    def stop(self) -> None:
        for channel in self.channels:
            channel.close()
        for proc in self.procs.values():
            proc.signal(signal.SIGCONT)
            proc.signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.process.wait(15)
            except subprocess.TimeoutExpired:
                proc.process.kill()
                proc.process.wait()

    def all_logs(self) -> str:
        return "\n".join(f"===== {p.name}\n{p.logs()[-6000:]}" for p in self.procs.values())


def wait_for(condition, timeout: float, what: str, logs=lambda: "") -> float:
    """Poll `condition` until true; returns the seconds it took; fails naming `what` (with logs) after `timeout`."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout, f"{what} (not within {timeout:.0f} s)\n{logs()}"
        time.sleep(0.05)
    return time.monotonic() - started


def http_get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return 0, ""


def metric_values(port: int, name: str) -> dict[str, float]:
    """Samples of `name` in the gateway's /metrics: the label text (or '') -> value."""
    _, text = http_get(port, "/metrics")
    values = {}
    for line in text.splitlines():
        m = re.fullmatch(rf"{name}(?:\{{(.*)\}})? (\S+)", line)
        if m:
            values[m[1] or ""] = float(m[2])
    return values
