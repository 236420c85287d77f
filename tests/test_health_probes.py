"""Liveness and readiness of every service, as the Kubernetes probes see them, on the real processes.

Each service runs alone (no pipeline): the gateway's /live must answer with
no scheduler at all, the scheduler's probes with no worker, a worker's
/ready only once it has loaded the model, a tokenizer's once its tokenizer is
loaded.  The `wait-for-model` init step must obey SIGTERM.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from services.common.health import Health, serve_health
from services.common.model_wait import missing_files
from services.common.protocol import Shutdown, Welcome, WorkerHello, WorkerReady
from services.common.zmq_io import send
from tests.pipeline import free_port
from tests.test_worker_process import FakeScheduler

REPO = Path(__file__).resolve().parents[1]


def get(port: int, path: str) -> tuple[int, dict | str]:
    """Status and body (JSON when it parses) of GET `path`; 0 when nothing answers."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            status, body = response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        status, body = exc.code, exc.read().decode()
    except OSError:
        return 0, ""
    try:
        return status, json.loads(body)
    except ValueError:
        return status, body


def wait_for(port: int, path: str, status: int, timeout: float = 60.0) -> dict | str:
    deadline = time.monotonic() + timeout
    while (answer := get(port, path))[0] != status:
        assert time.monotonic() < deadline, f"{path} answered {answer}, not {status}"
        time.sleep(0.1)
    return answer[1]


def start(module: str, *args: str, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with log.open("w") as out:
        return subprocess.Popen([sys.executable, "-m", module, *args], cwd=REPO, env=env, stdout=out,
                                stderr=subprocess.STDOUT)


def stop(proc: subprocess.Popen, timeout: float = 15.0) -> int:
    """SIGTERM, and the exit code (killed after `timeout`, which fails the caller's check)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return -9


# ------------------------------------------------------------------ the shared helper


def test_a_loop_that_stops_turning_fails_liveness_and_readiness():
    health = Health(stall_timeout=0.2)
    assert health.live_problem() is None and health.ready_problem() == "starting"
    health.ready()
    health.turn()
    assert health.live_problem() is None and health.ready_problem() is None
    time.sleep(0.3)
    assert "no progress for" in health.live_problem() and health.ready_problem() == health.live_problem()
    health.rest()  # e.g. a worker waiting for its next step: not a stall
    assert health.live_problem() is None


def test_health_http_answers_live_ready_and_refuses_other_paths():
    health, port = Health(stall_timeout=0), free_port()
    server = serve_health(health, port, host="127.0.0.1")
    try:
        assert get(port, "/live") == (200, {"status": "ok"})
        assert get(port, "/ready") == (503, {"error": "starting"})
        health.ready()
        assert get(port, "/ready?verbose=1") == (200, {"status": "ok"})
        assert get(port, "/metrics")[0] == 404
    finally:
        server.shutdown()
        server.server_close()
    assert serve_health(health, 0) is None


# ------------------------------------------------------------------ the real processes


def test_gateway_is_live_without_any_other_service(tmp_path):
    """Liveness must not depend on the pipeline: /live 200 with no scheduler, /health 503, SIGTERM exits 0."""
    port = free_port()
    proc = start("services.gateway.main", "--port", str(port), "--grpc-port", str(free_port()), "--host", "127.0.0.1",
                 "--scheduler-endpoint", f"ipc://{tmp_path}/nobody.sock",
                 "--tokenizer-endpoint", f"ipc://{tmp_path}/tokenizers.sock", log=tmp_path / "gateway.log")
    try:
        assert wait_for(port, "/live", 200) == ""
        assert get(port, "/health") == (503, {"error": "model not loaded"})
        assert get(port, "/metrics") == (200, "")
    finally:
        assert stop(proc) == 0, (tmp_path / "gateway.log").read_text()


def test_scheduler_is_ready_once_bound_without_workers(tmp_path):
    """Ready before any worker joins: the workers reach it through its Service, which lists ready pods only."""
    port = free_port()
    proc = start("services.scheduler.main", "--health-port", str(port),
                 "--gateway-endpoint", f"ipc://{tmp_path}/gateways.sock",
                 "--step-endpoint", f"ipc://{tmp_path}/steps.sock",
                 "--result-endpoint", f"ipc://{tmp_path}/results.sock", log=tmp_path / "scheduler.log")
    try:
        assert wait_for(port, "/ready", 200) == {"status": "ok"}
        assert get(port, "/live") == (200, {"status": "ok"})
    finally:
        assert stop(proc) == 0, (tmp_path / "scheduler.log").read_text()


def test_tokenizer_is_ready_once_its_tokenizer_is_loaded(tiny_model_path, tmp_path):
    port = free_port()
    proc = start("services.tokenizer.main", "--health-port", str(port), "--model-name", str(tiny_model_path),
                 "--gateway-endpoint", f"ipc://{tmp_path}/nobody.sock", log=tmp_path / "tokenizer.log")
    try:
        assert wait_for(port, "/ready", 200) == {"status": "ok"}
        assert get(port, "/live") == (200, {"status": "ok"})
    finally:
        assert stop(proc) == 0, (tmp_path / "tokenizer.log").read_text()


def test_worker_is_ready_only_after_the_model_is_loaded(tiny_model_path, tmp_path):
    scheduler, port = FakeScheduler(tmp_path), free_port()
    proc = start("services.worker.main", "--health-port", str(port), "--model-name", str(tiny_model_path),
                 "--device", "cpu", "--kv-cache-memory", "64MiB", "--step-endpoint", scheduler.step_endpoint,
                 "--result-endpoint", scheduler.result_endpoint, log=tmp_path / "worker.log")
    try:
        scheduler.expect(WorkerHello)
        assert wait_for(port, "/live", 200) == {"status": "ok"}
        assert get(port, "/ready") == (503, {"error": "waiting for the scheduler's welcome"})
        send(scheduler.pub, Welcome(rank=0))
        scheduler.expect(WorkerReady)
        assert wait_for(port, "/ready", 200, timeout=10) == {"status": "ok"}
        send(scheduler.pub, Shutdown(reason="test"))
        assert proc.wait(timeout=30) == 0
    finally:
        stop(proc)
        scheduler.close()


# ------------------------------------------------------------------ the init step


def test_wait_for_model_knows_an_incomplete_download(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert "no .safetensors" in missing_files(tmp_path)
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "model-00001-of-00002.safetensors").write_bytes(b"")
    assert missing_files(tmp_path) == "1 of 2 weight shards missing, e.g. model-00002-of-00002.safetensors"
    (tmp_path / "model-00002-of-00002.safetensors").write_bytes(b"")
    assert missing_files(tmp_path) is None


@pytest.mark.timeout(60)
def test_wait_for_model_stops_at_sigterm_and_finds_a_present_model(tiny_model_path, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_CACHE": str(tmp_path / "hub")}
    command = [sys.executable, "-m", "services.server_cli", "wait-for-model"]
    proc = subprocess.Popen([*command, "org/absent", "--interval", "0.2"], env=env, cwd=REPO,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while "waiting for model org/absent" not in proc.stderr.readline():
            assert time.monotonic() < deadline and proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 128 + signal.SIGTERM
    finally:
        proc.kill()
        proc.wait()
    found = subprocess.run([*command, str(tiny_model_path), "--timeout", "5"], env=env, cwd=REPO,
                           capture_output=True, text=True, timeout=30)
    assert found.returncode == 0 and found.stdout.strip() == str(tiny_model_path)
