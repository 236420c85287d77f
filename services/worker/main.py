"""Worker process (`text-generation-worker`): one rank's sockets, handshake, step loop and heartbeats.

Steps arrive on a SUB socket from the scheduler's PUB; results, failures and
the handshake go back on a DEALER to the scheduler's ROUTER.  Heartbeats use
their own DEALER from a thread, so a long forward pass never delays them; that
socket says `WorkerHello` first, since the scheduler knows ranks by the
connections that said hello.  A rank that sees a gap in the step ids missed a
Step on the PUB/SUB link: it reports the step failed rather than run on out of
step with the other ranks.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time

import torch
import zmq

from services.common.codec import ProtocolError
from services.common.gc_freeze import freeze_start_up_objects
from services.common.health import Health, serve_health
from services.common.links import parse_with_links
from services.common.logs import setup_logging
from services.common.protocol import Heartbeat, Shutdown, Step, StepFailed, Welcome, WorkerHello, WorkerReady
from services.common.zmq_io import make_socket, recv, send
from services.worker.config import WorkerConfig
from services.worker.engine import Engine
from services.worker.model_config import resolve_device

logger = logging.getLogger(__name__)

HELLO_INTERVAL_S = 0.2
HANDSHAKE_TIMEOUT_S = 120.0


class Interrupted(BaseException):
    """SIGTERM or SIGINT: unwind from wherever the process is (a BaseException, so step error handling ignores it)."""


class HandshakeTimeout(TimeoutError):
    """The scheduler never welcomed this rank."""


def _interrupt(signum: int, _frame) -> None:
    raise Interrupted(signal.Signals(signum).name)


class HeartbeatThread(threading.Thread):
    """Says `hello`, then sends Heartbeat(sender) every `interval` seconds on its own DEALER socket until stopped."""

    def __init__(self, ctx: zmq.Context, endpoint: str, hello: WorkerHello, interval: float) -> None:
        super().__init__(name="heartbeat", daemon=True)
        self.ctx, self.endpoint, self.hello, self.interval = ctx, endpoint, hello, interval
        self.sender = f"worker-{hello.rank}"
        self.stopped = threading.Event()

    def run(self) -> None:
        sock = make_socket(self.ctx, zmq.DEALER, connect=self.endpoint)
        send(sock, self.hello)  # queued until connected: the scheduler then takes this socket's heartbeats
        # A heartbeat nobody can take now is worthless later: drop it rather than block or queue.
        sock.setsockopt(zmq.SNDTIMEO, 0)
        try:
            while not self.stopped.is_set():
                try:
                    send(sock, Heartbeat(sender=self.sender))
                except zmq.Again:
                    pass
                self.stopped.wait(self.interval)
        finally:
            sock.close()

    def stop(self) -> None:
        self.stopped.set()
        self.join(timeout=2.0)


def _receive(sock: zmq.Socket):
    """The next message, or None for frames that are not a message of this protocol."""
    try:
        return recv(sock)
    except ProtocolError as exc:
        logger.warning("ignoring undecodable message: %s", exc)
        return None


def handshake(config: WorkerConfig, steps: zmq.Socket, results: zmq.Socket) -> bool:
    """Say hello until our Welcome comes through the SUB socket (proof it is subscribed); False on Shutdown."""
    hello = WorkerHello(rank=config.rank, world_size=config.world_size)
    deadline = time.monotonic() + HANDSHAKE_TIMEOUT_S
    next_hello = time.monotonic()
    while True:
        now = time.monotonic()
        if now >= deadline:
            raise HandshakeTimeout(f"no Welcome from the scheduler at {config.step_endpoint} / {config.result_endpoint} "
                               f"after {HANDSHAKE_TIMEOUT_S:.0f} s")
        if now >= next_hello:
            send(results, hello)
            next_hello = now + HELLO_INTERVAL_S
        if steps.poll(max(1, int((next_hello - now) * 1000))):
            message = _receive(steps)
            if isinstance(message, Welcome) and message.rank == config.rank:
                return True
            if isinstance(message, Shutdown):
                return False


def init_distributed(config: WorkerConfig) -> None:
    """Join this rank's tensor-parallel group: NCCL between GPUs, gloo on CPU."""
    device = resolve_device(config.device, config.rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    logger.info("Joining process group %s:%d as rank %d of %d (%s)",
                config.master_addr, config.master_port, config.rank, config.world_size, backend)
    torch.distributed.init_process_group(
        backend, init_method=f"tcp://{config.master_addr}:{config.master_port}",
        rank=config.rank, world_size=config.world_size,
    )


def _step_gap(expected: int | None, step_id: int) -> str | None:
    """Why `step_id` cannot follow the last step applied (None: it can; the first step may be any)."""
    if expected is None or step_id == expected:
        return None
    return f"missed step(s) {expected}..{step_id - 1}" if step_id > expected else f"step {step_id} after {expected - 1}"


def serve(config: WorkerConfig, engine: Engine, steps: zmq.Socket, results: zmq.Socket, health: Health) -> None:
    """Apply steps until Shutdown; a failed (or out-of-order) step drops the batch, is reported, and serving goes on."""
    expected: int | None = None
    while True:
        message = _receive(steps)
        if isinstance(message, Shutdown):
            logger.info("Shutdown requested%s", f": {message.reason}" if message.reason else "")
            return
        if not isinstance(message, Step):
            continue
        gap, expected = _step_gap(expected, message.step_id), message.step_id + 1
        if gap:
            logger.error("Step %d: %s; dropping the batch", message.step_id, gap)
            engine.reset()
            send(results, StepFailed(step_id=message.step_id, rank=config.rank, message=f"worker rank {config.rank} {gap}"))
            continue
        health.turn()  # a step that never returns fails /live after HEALTH_STALL_TIMEOUT_S
        try:
            result = engine.step(message)
        except Exception as exc:
            logger.exception("Step %d failed; dropping the batch", message.step_id)
            engine.reset()
            send(results, StepFailed(step_id=message.step_id, rank=config.rank, message=str(exc) or repr(exc),
                                     out_of_memory=isinstance(exc, torch.OutOfMemoryError)))
            continue
        finally:
            health.rest()
        if config.rank == 0:
            send(results, result)


def main(argv: list[str] | None = None) -> int:
    config = parse_with_links(WorkerConfig, argv, "Worker rank: model weights, KV cache, forward passes and sampling.")
    setup_logging(f"worker-{config.rank}")
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    health = Health(config.health_stall_timeout)
    health.not_ready("waiting for the scheduler's welcome")
    serve_health(health, config.health_port)
    ctx = zmq.Context()
    heartbeat: HeartbeatThread | None = None
    try:
        steps = make_socket(ctx, zmq.SUB, connect=config.step_endpoint)
        steps.setsockopt(zmq.SUBSCRIBE, b"")
        results = make_socket(ctx, zmq.DEALER, connect=config.result_endpoint)
        if not handshake(config, steps, results):
            return 0
        heartbeat = HeartbeatThread(ctx, config.result_endpoint, WorkerHello(config.rank, config.world_size),
                                    config.heartbeat_interval)
        heartbeat.start()
        health.not_ready("loading the model")
        if config.world_size > 1:
            init_distributed(config)
        started = time.monotonic()
        engine = Engine(config)
        info = engine.model_info()
        logger.info("Model loaded in %.1f s: %s on %s (%s), max_sequence_length %d, max_batch_size %d",
                    time.monotonic() - started, info.model_path, info.device, info.dtype,
                    info.max_sequence_length, info.max_batch_size)
        send(results, WorkerReady(rank=config.rank, model=info, num_blocks=engine.cache.num_blocks,
                                  block_size=engine.cache.block_size))
        freeze_start_up_objects()
        health.ready()
        serve(config, engine, steps, results, health)
        return 0
    except Interrupted as signal_name:
        logger.info("%s received, exiting", signal_name)
        return 0
    except HandshakeTimeout as exc:
        logger.error("Handshake failed: %s", exc)
        return 1
    except Exception:
        logger.exception("Worker rank %d failed", config.rank)
        return 1
    finally:
        if heartbeat is not None:
            heartbeat.stop()
        ctx.destroy(linger=0)
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
