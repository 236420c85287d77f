"""The gateway's model replicas: discovery, checks at join, routing by load, and re-sending when a replica is lost.

A replica is one scheduler with its worker ranks; the gateway holds one
`SchedulerClient` per scheduler address (`SCHEDULER_ENDPOINT`: a list, host
names re-resolved every `DISCOVERY_INTERVAL_S`).  `ReplicaSet` offers the
servicer and the health checker the interface of a single `SchedulerClient`,
so they do not know how many replicas there are.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import zmq.asyncio

from services.common import discovery
from services.common.protocol import GenerateRequest, ModelInfo, Pong, SchedulerInfo, StepStats
from services.gateway.generation import Generation
from services.gateway.scheduler_client import SchedulerClient
from services.gateway.tokenizer_pool import TokenizerPool

log = logging.getLogger(__name__)

NO_REPLICA = "no model worker is ready"
# What replicas must agree on to serve the same clients (ModelInfo fields); device, dtype, batch size may differ.
MUST_MATCH = ("model_name", "encoder_decoder", "vocab_size", "eos_token_id", "pad_token_id", "max_sequence_length",
              "max_new_tokens")


def model_difference(reference: ModelInfo, other: ModelInfo) -> str:
    """Why `other` cannot serve beside `reference` (empty: it can)."""
    return ", ".join(f"{name} {getattr(other, name)!r} != {getattr(reference, name)!r}"
                     for name in MUST_MATCH if getattr(other, name) != getattr(reference, name))


class ReplicaSet:
    """Every model replica this gateway knows; requests go to the least loaded one that is ready.

    * Join: the first replica whose `SchedulerInfo` arrives fixes the model and
      the limits (`info`); a later one with another model or other limits is
      refused with an error log line and never gets work.
    * Routing: each input goes to the ready replica with the smallest reported
      load (queue + running, from its Pong every second or its step stats) plus
      what this gateway sent it since that report; its cancel and tokens stay on
      that replica.
    * Loss: a replica that stops answering pings, or whose worker group is lost,
      fails only its own in-flight requests; those without any token yet are
      re-sent to another ready replica instead (at most once per replica).
    """

    def __init__(self, ctx: zmq.asyncio.Context, endpoints: str, gateway_id: str, pool: TokenizerPool,
                 discovery_interval: float = 10.0) -> None:
        self.ctx, self.endpoints, self.gateway_id, self.pool = ctx, endpoints, gateway_id, pool
        self.discovery_interval = discovery_interval
        self.replicas: dict[str, SchedulerClient] = {}
        self.refused: set[str] = set()
        self.owner: dict[str, SchedulerClient] = {}  # request id -> the replica it runs on
        self.requests: dict[str, GenerateRequest] = {}  # kept until the end, for a re-send
        self.attempts: dict[str, int] = {}
        self.sent_since_report: dict[str, int] = {}
        self.info: SchedulerInfo | None = None
        self.ready = asyncio.Event()
        self.on_step: Callable[[StepStats], None] = lambda stats: None
        self.on_finished: Callable[[Generation], None] = lambda generation: None
        self.on_failed: Callable[[str, list[Generation]], None] = lambda message, generations: None
        self.on_batch_gauges: Callable[[int, int, int, int], None] = lambda size, tokens, remaining, queue: None
        self.on_replica: Callable[[str, int, int, bool], None] = lambda name, queue, batch, ready: None
        self.on_routed: Callable[[str, int], None] = lambda name, inputs: None
        self._tasks: dict[str, asyncio.Task] = {}

    # ------------------------------------------------------------------ state

    def accepted(self, client: SchedulerClient) -> bool:
        return client.info is not None and client.endpoint not in self.refused

    def usable(self, client: SchedulerClient) -> bool:
        return self.accepted(client) and client.reachable and client.workers_ready

    @property
    def reachable(self) -> bool:
        """Some accepted replica answers (health: 'scheduler not answering' otherwise)."""
        return any(self.accepted(c) and c.reachable for c in self.replicas.values())

    async def answers(self, timeout: float = 0.5) -> bool:
        """Whether any replica answers; replicas declared lost get a short ping (they may be back)."""
        if self.reachable:
            return True
        candidates = [c for c in self.replicas.values() if self.accepted(c)]
        if not candidates:
            return False
        return any(await asyncio.gather(*(c.answers(timeout) for c in candidates)))

    async def ping(self, timeout: float = 5.0) -> Pong:
        """Ping the best replica; `workers_ready` says whether any replica can take work now."""
        target = self._pick() or next((c for c in self.replicas.values() if self.accepted(c)), None)
        if target is None:
            return Pong(0, workers_ready=False)
        pong = await target.ping(timeout)
        return Pong(pong.nonce, any(self.usable(c) for c in self.replicas.values()), pong.queue_size, pong.batch_size)

    def _load(self, client: SchedulerClient) -> tuple[int, int]:
        reported = client.queue_size + client.batch_size + self.sent_since_report.get(client.endpoint, 0)
        return reported, len(client.generations)

    def _pick(self, exclude: SchedulerClient | None = None) -> SchedulerClient | None:
        ready = [c for c in self.replicas.values() if c is not exclude and self.usable(c)]
        return min(ready, key=self._load, default=None)

    # ------------------------------------------------------------------ requests

    def submit(self, generations: list[Generation], requests: list[GenerateRequest]) -> None:
        """Place each input on the least loaded ready replica (one Submit per replica)."""
        placed: dict[str, tuple[SchedulerClient, list[Generation], list[GenerateRequest]]] = {}
        unplaced = []
        for generation, request in zip(generations, requests, strict=True):
            self.requests[request.request_id] = request
            self.attempts[request.request_id] = 1
            client = self._pick()
            if client is None:
                unplaced.append(generation)
                continue
            self.sent_since_report[client.endpoint] = self.sent_since_report.get(client.endpoint, 0) + 1
            entry = placed.setdefault(client.endpoint, (client, [], []))
            entry[1].append(generation)
            entry[2].append(request)
        for client, placed_generations, placed_requests in placed.values():
            self._send_to(client, placed_generations, placed_requests)
        if unplaced:
            self._fail(unplaced, NO_REPLICA)

    def _send_to(self, client: SchedulerClient, generations: list[Generation], requests: list[GenerateRequest]) -> None:
        for generation in generations:
            self.owner[generation.request_id] = client
        client.submit(generations, requests)
        self.on_routed(client.endpoint, len(requests))

    def cancel(self, request_ids: list[str]) -> None:
        by_owner: dict[str, tuple[SchedulerClient, list[str]]] = {}
        for request_id in request_ids:
            owner = self.owner.get(request_id)
            self._forget(request_id)
            if owner is None:
                self.pool.close(request_id)
            else:
                by_owner.setdefault(owner.endpoint, (owner, []))[1].append(request_id)
        for owner, ids in by_owner.values():
            owner.cancel(ids)

    def finish(self, generation: Generation) -> None:
        """A generation delivered its final event: forget it everywhere."""
        owner = self.owner.get(generation.request_id)
        if owner is not None:
            owner.finish(generation)  # calls back _finished
        else:
            self.pool.close(generation.request_id)
            self._finished(generation)

    def _finished(self, generation: Generation) -> None:
        self._forget(generation.request_id)
        self.on_finished(generation)

    def _forget(self, request_id: str) -> None:
        self.owner.pop(request_id, None)
        self.requests.pop(request_id, None)
        self.attempts.pop(request_id, None)

    def _fail(self, generations: list[Generation], message: str) -> None:
        for generation in generations:
            generation.fail(message)
            self.pool.close(generation.request_id)
            self._forget(generation.request_id)
        self.on_failed(message, generations)

    def _on_lost(self, client: SchedulerClient, generations: list[Generation], message: str, retryable: bool) -> None:
        """`client` lost these requests: re-send those without a token (when it may), fail the others."""
        failed: list[Generation] = []
        moved: dict[str, tuple[SchedulerClient, list[Generation], list[GenerateRequest]]] = {}
        for generation in generations:
            request_id = generation.request_id
            self.owner.pop(request_id, None)
            request = self.requests.get(request_id)
            target = None
            if (retryable and request is not None and not generation.finished and generation.first_token_at is None
                    and self.attempts.get(request_id, 0) < max(2, len(self.replicas))):
                target = self._pick(exclude=client)
            if target is None:
                failed.append(generation)
                continue
            self.attempts[request_id] += 1
            entry = moved.setdefault(target.endpoint, (target, [], []))
            entry[1].append(generation)
            entry[2].append(request)
        for target, moved_generations, moved_requests in moved.values():
            log.warning("replica %s lost %d request(s) with no token yet (%s): re-sent to replica %s",
                        client.endpoint, len(moved_requests), message, target.endpoint)
            self.sent_since_report[target.endpoint] = self.sent_since_report.get(target.endpoint, 0) + len(moved_requests)
            self._send_to(target, moved_generations, moved_requests)
        if failed:
            self._fail(failed, message)

    # ------------------------------------------------------------------ replica reports

    def _on_info(self, client: SchedulerClient) -> None:
        assert client.info is not None
        if self.info is None:
            self.info = client.info
            self.ready.set()
            log.info("replica %s is ready and sets the model: %s, max_sequence_length=%d, max_new_tokens=%d",
                     client.endpoint, client.info.model.model_name, client.info.model.max_sequence_length,
                     client.info.model.max_new_tokens)
            return
        difference = model_difference(self.info.model, client.info.model)
        if difference:
            if client.endpoint not in self.refused:
                log.error("refusing replica %s: it serves another model or other limits (%s)", client.endpoint,
                          difference)
            self.refused.add(client.endpoint)
            return
        self.refused.discard(client.endpoint)
        log.info("replica %s is ready (%d of %d ready)", client.endpoint,
                 sum(self.usable(c) for c in self.replicas.values()), len(self.replicas))

    def _on_report(self, client: SchedulerClient) -> None:
        self.sent_since_report[client.endpoint] = 0
        self.on_replica(client.endpoint, client.queue_size, client.batch_size, self.usable(client))
        # Gauges over every replica, so each gateway's batch gauges are the whole pool's (not one step's).
        live = [c for c in self.replicas.values() if self.accepted(c) and c.reachable]
        size = sum(c.batch_size for c in live)
        tokens = sum(c.last_stats.batch_input_tokens for c in live if c.last_stats and c.batch_size)
        remaining = sum(c.last_stats.batch_remaining_tokens for c in live if c.last_stats and c.batch_size)
        self.on_batch_gauges(size, tokens, remaining, sum(c.queue_size for c in live))

    # ------------------------------------------------------------------ membership

    def _add(self, endpoint: str, group: asyncio.TaskGroup) -> None:
        client = SchedulerClient(self.ctx, endpoint, self.gateway_id, self.pool)
        # Through self: the gateway sets its hooks (metrics) once the model is known, after this connection exists.
        client.on_step = lambda stats: self.on_step(stats)
        client.on_finished = self._finished
        client.on_failed = lambda message, generations: self.on_failed(message, generations)
        client.on_lost = self._on_lost
        client.on_report = self._on_report
        client.on_info = self._on_info
        self.replicas[endpoint] = client
        self._tasks[endpoint] = group.create_task(client.run())
        log.info("connecting to the scheduler of replica %s", endpoint)

    def _remove(self, endpoint: str) -> None:
        client = self.replicas.pop(endpoint)
        log.warning("replica %s is no longer in %s: moving or failing its requests", endpoint, self.endpoints)
        self._tasks.pop(endpoint).cancel()
        client.scheduler_lost()
        client.sock.close(linger=0)
        self.on_replica(endpoint, 0, 0, False)

    async def run(self) -> None:
        """Keep one connection per replica address found; ends (with an error) only if a connection's loop breaks."""
        async with asyncio.TaskGroup() as group:
            loop = asyncio.get_running_loop()
            while True:
                # Off the event loop: a slow DNS answer must not hold up the calls being served.
                found = await loop.run_in_executor(None, discovery.resolve, self.endpoints)
                for endpoint in found:
                    if endpoint not in self.replicas:
                        self._add(endpoint, group)
                for endpoint in [e for e in self.replicas if e not in found]:
                    self._remove(endpoint)
                await asyncio.sleep(self.discovery_interval)
