"""The scheduler process: gateways in, steps out to the worker ranks, tokens back to gateways.

Loop (one thread, one poller):
  1. receive gateway messages (hello, submit, cancel, ping) and worker messages
     (hello, ready, step results, failures, heartbeats);
  2. declare the worker group lost when a rank disconnects, its heartbeats stop
     or a step passes its deadline, failing its requests and stopping its ranks;
  3. when no step is in flight and the workers are ready, publish the next Step;
  4. end requests still queued whose deadline passed (TIME_LIMIT, no tokens).
"""

from __future__ import annotations

import logging
import signal
import time

import zmq
from zmq.utils.monitor import recv_monitor_message

from services.common import links
from services.common.codec import ProtocolError
from services.common.gc_freeze import freeze_start_up_objects
from services.common.health import Health, serve_health
from services.common.logs import setup_logging
from services.common.protocol import (
    Cancel,
    GatewayHello,
    Heartbeat,
    ModelInfo,
    Ping,
    Pong,
    RequestFailed,
    SchedulerInfo,
    Shutdown,
    Step,
    StepFailed,
    StepResult,
    Submit,
    TokenBatch,
    TokenOutput,
    Welcome,
    WorkerHello,
    WorkerReady,
)
from services.common.zmq_io import make_socket, recv_from, recv_from_with_fd, send, send_to
from services.scheduler.admission import MemoryModel
from services.scheduler.batcher import Batcher, Sequence
from services.scheduler.blocks import BlockManager
from services.scheduler.config import SchedulerConfig
from services.scheduler.peers import WorkerPeers

log = logging.getLogger(__name__)


class SchedulerProcess:
    """Owns the sockets and the worker group's state; the batching decisions live in `Batcher`."""

    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.ctx = zmq.Context()
        self.gateways = make_socket(self.ctx, zmq.ROUTER, bind=config.gateway_endpoint)
        self.steps_out = make_socket(self.ctx, zmq.PUB, bind=config.step_endpoint)
        self.workers_in = make_socket(self.ctx, zmq.ROUTER, bind=config.result_endpoint)
        self.poller = zmq.Poller()
        self.poller.register(self.gateways, zmq.POLLIN)
        self.poller.register(self.workers_in, zmq.POLLIN)
        # Disconnects on the result socket say at once that a rank is gone (its process died).
        self.worker_events = self.workers_in.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self.poller.register(self.worker_events, zmq.POLLIN)
        self.peers = WorkerPeers(config.num_shard)
        self.known_gateways: set[bytes] = set()
        self.model: ModelInfo | None = None
        self.ready_ranks: dict[int, ModelInfo] = {}
        self.kv_pools: dict[int, tuple[int, int]] = {}  # rank -> (num_blocks, block_size) of its KV pool
        self.last_seen: dict[int, float] = {}
        self.batcher: Batcher | None = None
        self.in_flight: tuple[Step, float] | None = None
        self.stopping = False
        # Ready once its sockets are bound: gateways and workers reach it through its Service, so its
        # readiness must not wait for the workers (they could never connect).
        self.health = Health(config.health_stall_timeout)

    # ------------------------------------------------------------------ worker group

    @property
    def workers_ready(self) -> bool:
        return self.model is not None and len(self.ready_ranks) == self.config.num_shard

    def _on_worker(self, identity: bytes, fd: int, message: object) -> None:
        if isinstance(message, WorkerHello):
            self._on_worker_hello(identity, fd, message)
            return
        rank = self.peers.rank_of(identity)
        claimed = getattr(message, "rank", rank)
        if rank is None or claimed != rank:
            # Not from a rank, or a rank speaking for another: a rank is what its handshake said.
            log.warning("ignoring %s from %s", type(message).__name__,
                        "a peer that never said hello" if rank is None else f"rank {rank} claiming rank {claimed}")
            return
        if isinstance(message, Heartbeat):
            self.last_seen[rank] = time.monotonic()
        elif isinstance(message, WorkerReady):
            self._on_worker_ready(message)
        elif isinstance(message, StepResult) and rank == 0:
            self._on_step_result(message)
        elif isinstance(message, StepFailed):
            self._on_step_failed(message)

    def _on_worker_hello(self, identity: bytes, fd: int, hello: WorkerHello) -> None:
        refusal = self.peers.refusal(hello.rank, hello.world_size)
        if refusal is None and hello.rank in self.ready_ranks and self.peers.rank_of(identity) != hello.rank:
            refusal = f"rank {hello.rank} is already in the group"
        if refusal:
            log.warning("refusing a worker hello: %s", refusal)
            return
        if self.peers.rank_of(identity) is None:
            log.info("worker rank %d/%d connected", hello.rank, hello.world_size)
        self.peers.hello(identity, fd, hello.rank)
        self.last_seen[hello.rank] = time.monotonic()
        send(self.steps_out, Welcome(hello.rank))

    def _on_worker_ready(self, message: WorkerReady) -> None:
        self.last_seen[message.rank] = time.monotonic()
        self.ready_ranks[message.rank] = message.model
        self.kv_pools[message.rank] = (message.num_blocks, message.block_size)
        log.info("worker rank %d ready (%d/%d): %s", message.rank, len(self.ready_ranks), self.config.num_shard,
                 message.model.model_name)
        if len(self.ready_ranks) < self.config.num_shard:
            return
        self.model = self.ready_ranks[0]
        batch_size = min(self.config.max_batch_size, self.model.max_batch_size)
        if self.batcher is None:
            self.batcher = self._new_batcher(batch_size)
        log.info("all %d worker rank(s) ready; serving with max_batch_size=%d", self.config.num_shard, batch_size)
        for gateway in self.known_gateways:
            self._send_gateway(gateway, self._info())

    def _new_batcher(self, batch_size: int) -> Batcher:
        """The batcher over the smallest KV block pool of the ready ranks, admitting by TGIS's weight model."""
        assert self.model is not None
        num_blocks = min(blocks for blocks, _ in self.kv_pools.values())
        block_size = self.kv_pools[0][1]
        memory = MemoryModel.from_config(self.config.estimate_memory, self.config.batch_safety_margin,
                                         self.model.max_sequence_length, batch_size, num_blocks * block_size)
        memory.check_startup(self.model.max_sequence_length)
        # Encoder-decoder models: a block of encoder positions holds decoder K/V (worker's seq2seq.py), never shared.
        prefix_caching = self.config.prefix_caching and not self.model.encoder_decoder
        log.info("KV block pool: %d blocks of %d tokens (prefix caching %s); admission weight limit %s",
                 num_blocks, block_size, "on" if prefix_caching else "off", memory.weight_limit or "none")
        return Batcher(batch_size, self.config.max_waiting_tokens, self.model.eos_token_id,
                       BlockManager(num_blocks, block_size, prefix_caching), memory,
                       self.config.max_prefill_tokens, self.config.max_prefill_tokens_while_decoding,
                       self.model.max_loras)

    def _check_worker_liveness(self) -> None:
        now = time.monotonic()
        lost = [r for r, seen in self.last_seen.items() if now - seen > self.config.worker_timeout]
        if lost:
            log.error("worker rank(s) %s sent no heartbeat for %.0f s", lost, self.config.worker_timeout)
            self._lose_group(f"worker rank {lost[0]} stopped responding", f"worker rank {lost[0]} lost")
        elif self.in_flight is not None and now - self.in_flight[1] > self.config.step_timeout:
            step_id = self.in_flight[0].step_id
            log.error("step %d got no result within %.0f s", step_id, self.config.step_timeout)
            self._lose_group(f"step {step_id} got no result within {self.config.step_timeout:.0f} s",
                             f"step {step_id} timed out")

    def _on_worker_events(self) -> None:
        while self.worker_events.poll(0):
            event = recv_monitor_message(self.worker_events)
            rank = self.peers.disconnected(event["value"])
            if rank is not None and rank in self.last_seen:
                log.error("worker rank %d disconnected", rank)
                self._lose_group(f"worker rank {rank} stopped responding", f"worker rank {rank} lost")

    def _lose_group(self, message: str, shutdown_reason: str) -> None:
        """Fail every request the group holds or would take, and stop all its ranks."""
        log.error("declaring the worker group lost: %s", message)
        if self.batcher is not None:
            # Queued requests too: no worker group will take them until one joins again. Retryable: a gateway
            # re-sends those that had no token yet to another replica.
            self._fail_running(message, queued_too=True, retryable=True)
        # The other ranks cannot go on without it, and a rank that wakes up holds a stale batch: stop them all,
        # so their supervisor (launcher, Kubernetes) restarts the group and the ranks join again from scratch.
        send(self.steps_out, Shutdown(shutdown_reason))
        for rank in range(self.config.num_shard):
            self.peers.forget_rank(rank)
        self.in_flight = None
        self.last_seen.clear()
        self.ready_ranks.clear()

    def _fail_running(self, message: str, queued_too: bool = False, retryable: bool = False) -> None:
        assert self.batcher is not None
        self.in_flight = None
        failed = self.batcher.fail_step()
        if queued_too:
            failed += list(self.batcher.waiting)
            self.batcher.waiting.clear()
        by_gateway: dict[bytes, list[str]] = {}
        for sequence in failed:
            by_gateway.setdefault(sequence.gateway, []).append(sequence.request_id)
        for gateway, ids in by_gateway.items():
            self._send_gateway(gateway, RequestFailed(ids, message, retryable))
        if failed:
            log.error("failed %d request(s): %s", len(failed), message)

    def _on_step_result(self, result: StepResult) -> None:
        if self.in_flight is None or result.step_id != self.in_flight[0].step_id:
            log.warning("ignoring result of step %d (not in flight)", result.step_id)
            return
        step, started = self.in_flight
        self.in_flight = None
        duration = time.monotonic() - started
        assert self.batcher is not None
        stats = self.batcher.stats(duration, result.forward_ns / 1e9)
        forwarded, failures = self.batcher.complete_step(result.outputs, result.failed, prefill_seconds=duration)
        for sequence, message in failures:
            log.warning("request %s failed on the workers: %s", sequence.request_id, message)
            self._send_gateway(sequence.gateway, RequestFailed([sequence.request_id], message))
        self._forward(forwarded, self.batcher.fill_gauges(stats))

    def _on_step_failed(self, failure: StepFailed) -> None:
        reason = "GPU out of memory" if failure.out_of_memory else failure.message
        if self.config.num_shard > 1:
            # The other ranks may wait in a collective for the failed one, or hold state it no longer has.
            log.error("step %d failed on rank %d: %s", failure.step_id, failure.rank, failure.message)
            self._lose_group(reason, f"rank {failure.rank} failed step {failure.step_id}")
            return
        if self.in_flight is None or failure.step_id != self.in_flight[0].step_id:
            return
        log.error("step %d failed on rank %d: %s", failure.step_id, failure.rank, failure.message)
        self._fail_running(reason)

    # ------------------------------------------------------------------ gateways

    def _info(self) -> SchedulerInfo:
        assert self.model is not None
        return SchedulerInfo(self.model, self.config.max_waiting_tokens)

    def _send_gateway(self, gateway: bytes, message: object) -> None:
        try:
            send_to(self.gateways, gateway, message)
        except zmq.ZMQError as exc:
            log.warning("gateway %r unreachable (%s): dropping its requests", gateway, exc)
            self.known_gateways.discard(gateway)
            if self.batcher is not None:
                self.batcher.drop_gateway(gateway)

    def _on_gateway(self, gateway: bytes, message: object) -> None:
        if isinstance(message, GatewayHello):
            if gateway not in self.known_gateways:  # it says hello every second until this replica is ready
                log.info("gateway %s connected", message.gateway_id)
            self.known_gateways.add(gateway)
            if self.workers_ready:
                self._send_gateway(gateway, self._info())
        elif isinstance(message, Submit):
            self.known_gateways.add(gateway)
            if not self.workers_ready:
                # Fail fast rather than queue for a worker group that may never come back.
                self._send_gateway(gateway, RequestFailed([r.request_id for r in message.requests],
                                                          "no model worker is ready", retryable=True))
            else:
                self.batcher.submit(gateway, message.requests)
        elif isinstance(message, Cancel):
            if self.batcher is not None:
                self.batcher.cancel(message.request_ids)
        elif isinstance(message, Ping):
            batcher = self.batcher
            self._send_gateway(gateway, Pong(
                message.nonce, self.workers_ready,
                len(batcher.waiting) if batcher else 0, len(batcher.running) if batcher else 0,
            ))

    def _forward(self, forwarded: list[tuple[Sequence, TokenOutput]], stats=None) -> None:
        by_gateway: dict[bytes, list[TokenOutput]] = {}
        for sequence, output in forwarded:
            by_gateway.setdefault(sequence.gateway, []).append(output)
        if stats is not None and not by_gateway and self.known_gateways:
            by_gateway[next(iter(self.known_gateways))] = []
        # Step stats go to one gateway so that a step is counted once across gateways.
        for i, (gateway, outputs) in enumerate(by_gateway.items()):
            self._send_gateway(gateway, TokenBatch(outputs, stats if i == 0 else None))

    # ------------------------------------------------------------------ loop

    def _receive(self, timeout_ms: int) -> None:
        for sock, _ in self.poller.poll(timeout_ms):
            if sock is self.worker_events:
                self._on_worker_events()
                continue
            while sock.poll(0):
                message = None
                try:
                    if sock is self.gateways:
                        peer, message = recv_from(sock)
                        self._on_gateway(peer, message)
                    else:
                        peer, fd, message = recv_from_with_fd(sock)
                        self._on_worker(peer, fd, message)
                except ProtocolError as exc:
                    log.warning("dropping bad message: %s", exc)
                except Exception:  # one message's bug must not stop the scheduler serving everyone else
                    log.exception("failed to handle %s", type(message).__name__ if message else "a message")

    def run(self) -> None:
        log.info("scheduler up: gateways on %s, steps on %s, results on %s; waiting for %d worker rank(s)",
                 self.config.gateway_endpoint, self.config.step_endpoint, self.config.result_endpoint,
                 self.config.num_shard)
        freeze_start_up_objects()
        self.health.ready()
        while not self.stopping:
            self.health.turn()
            busy = self.batcher is not None and self.in_flight is None and self.workers_ready and (
                self.batcher.waiting or self.batcher.running or self.batcher.to_remove)
            self._receive(0 if busy else 50)
            if self.batcher is None:
                self._check_worker_liveness()
                continue
            self._check_worker_liveness()
            if self.in_flight is None and self.workers_ready:
                step = self.batcher.schedule()
                if step is not None:
                    send(self.steps_out, step)
                    self.in_flight = (step, time.monotonic())
            # After scheduling, as in TGIS: a request that can start now gets its first token whatever its
            # deadline; only one left waiting behind a running batch can expire in the queue.
            expired = self.batcher.expire_waiting()
            if expired:
                self._forward([(f.sequence, f.output) for f in expired])
        send(self.steps_out, Shutdown("scheduler stopping"))
        time.sleep(0.1)  # let the shutdown reach the ranks before the socket closes
        links.stop_authenticators()
        self.ctx.destroy(linger=0)


def main(argv: list[str] | None = None) -> int:
    setup_logging("scheduler")
    config = links.parse_with_links(SchedulerConfig, argv, "Queue and continuous batching for the worker ranks.")
    process = SchedulerProcess(config)
    serve_health(process.health, config.health_port)

    def stop(signum, _frame) -> None:
        log.info("received signal %d, stopping", signum)
        process.stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    process.run()
    log.info("scheduler stopped")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
