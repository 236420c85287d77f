"""The gateway's connection to one scheduler (one model replica): submit and cancel requests, route tokens back.

One reader task receives every message of this replica's scheduler and routes
token outputs to their `Generation` by request id, then hands the resulting
ids to the tokenizer pool in one batch per step.  `ReplicaSet` (replicas.py)
holds one of these per replica and decides where requests go.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import socket
import time
from collections.abc import Callable

import zmq
import zmq.asyncio

from services.common.codec import ProtocolError
from services.common.protocol import (
    Cancel,
    GatewayHello,
    GenerateRequest,
    Ping,
    Pong,
    RequestFailed,
    SchedulerInfo,
    StepStats,
    StopReason,
    Submit,
    TokenBatch,
)
from services.common.zmq_io import async_recv, make_socket, send_to_nowait
from services.gateway.generation import Generation
from services.gateway.tokenizer_pool import TokenizerPool

log = logging.getLogger(__name__)


class SchedulerClient:
    """DEALER connection to one scheduler plus the table of its in-flight generations and its last load report."""

    def __init__(self, ctx: zmq.asyncio.Context, endpoint: str, gateway_id: str, pool: TokenizerPool) -> None:
        self.sock = make_socket(ctx, zmq.DEALER, connect=endpoint)
        self.endpoint = endpoint
        self.gateway_id = gateway_id
        self.pool = pool
        self.info: SchedulerInfo | None = None
        self.ready = asyncio.Event()
        self.generations: dict[str, Generation] = {}
        self.on_step: Callable[[StepStats], None] = lambda stats: None
        self.on_finished: Callable[[Generation], None] = lambda generation: None
        # Told of each RequestFailed (message, the generations it failed), for the step-failure metrics.
        self.on_failed: Callable[[str, list[Generation]], None] = lambda message, generations: None
        # False from the moment the scheduler is declared lost until it answers again: new calls fail at once.
        self.reachable = True
        # Generations this replica lost (message, retryable): failed here unless the replica set re-sends them.
        self.on_lost: Callable[[SchedulerClient, list[Generation], str, bool], None] = self._fail_lost
        # The replica's own load report (Pong, step stats): requests queued and running, workers ready.
        self.queue_size = 0
        self.batch_size = 0
        self.workers_ready = False
        self.on_report: Callable[[SchedulerClient], None] = lambda client: None
        self.on_info: Callable[[SchedulerClient], None] = lambda client: None  # the model info arrived
        self.last_stats: StepStats | None = None
        self._pings: dict[int, asyncio.Future] = {}
        self._nonces = itertools.count(1)

    def _send(self, message: object) -> None:
        send_to_nowait(self.sock, None, message, "scheduler")

    def submit(self, generations: list[Generation], requests: list[GenerateRequest]) -> None:
        for generation in generations:
            self.generations[generation.request_id] = generation
        self._send(Submit(requests))

    def cancel(self, request_ids: list[str]) -> None:
        """Stop requests the client no longer waits for (or that a stop sequence ended)."""
        for request_id in request_ids:
            self.generations.pop(request_id, None)
            self.pool.close(request_id)
        if request_ids:
            self._send(Cancel(request_ids))

    async def ping(self, timeout: float = 5.0) -> Pong:
        nonce = next(self._nonces)
        future = asyncio.get_running_loop().create_future()
        self._pings[nonce] = future
        self._send(Ping(nonce))
        try:
            return await asyncio.wait_for(future, timeout)
        finally:
            self._pings.pop(nonce, None)

    async def answers(self, timeout: float = 0.5) -> bool:
        """Whether the scheduler is reachable; once it was declared lost, a short ping decides (it may be back)."""
        if self.reachable:
            return True
        try:
            await self.ping(timeout)
        except TimeoutError:
            return False
        return True

    async def run(self) -> None:
        """Say hello (again every second until the model info arrives), then route messages until cancelled.

        Ends (with an error) only if one of its loops breaks, which the health check reports.
        """
        async with asyncio.TaskGroup() as group:
            group.create_task(self._hello_until_ready())
            group.create_task(self._watch_scheduler())
            group.create_task(self._receive())

    async def _receive(self) -> None:
        while True:
            try:
                message = await async_recv(self.sock)
            except ProtocolError as exc:
                log.warning("dropping bad message from the scheduler: %s", exc)
                continue
            if not self.reachable:
                log.info("scheduler answers again")
                self.reachable = True
            try:
                self._dispatch(message)
            except Exception:  # one message's bug must not stop the routing of everyone else's tokens
                log.exception("failed to handle a %s from the scheduler", type(message).__name__)

    async def _watch_scheduler(self, interval: float = 1.0, misses_allowed: int = 3) -> None:
        """Fail in-flight requests when the scheduler stops answering pings, rather than leave them hanging."""
        await self.ready.wait()
        misses = 0
        while True:
            await asyncio.sleep(interval)
            try:
                await self.ping(timeout=interval)
                misses = 0
            except TimeoutError:
                misses += 1
                if misses == misses_allowed:
                    self.scheduler_lost()

    def scheduler_lost(self) -> None:
        self.reachable = False
        lost = list(self.generations.values())
        log.error("scheduler at %s stopped answering; failing %d in-flight request(s)", self.endpoint, len(lost))
        self.generations.clear()
        self.on_lost(self, lost, "lost connection to the scheduler", True)
        if lost:
            # Queued on the socket: should the scheduler come back, it frees their batch slots.
            self._send(Cancel([g.request_id for g in lost]))

    async def _hello_until_ready(self) -> None:
        while not self.ready.is_set():
            self._send(GatewayHello(self.gateway_id))
            try:
                await asyncio.wait_for(self.ready.wait(), 1.0)
            except TimeoutError:
                continue

    def _dispatch(self, message: object) -> None:
        if isinstance(message, TokenBatch):
            self._on_tokens(message)
        elif isinstance(message, SchedulerInfo):
            if self.info is None:
                log.info("scheduler ready: model %s, max_sequence_length=%d, max_new_tokens=%d",
                         message.model.model_name, message.model.max_sequence_length, message.model.max_new_tokens)
            self.info = message
            self.workers_ready = True
            self.ready.set()
            self.on_info(self)
        elif isinstance(message, RequestFailed):
            failed = [g for request_id in message.request_ids if (g := self.generations.pop(request_id, None))]
            if message.retryable:
                self.workers_ready = False  # its worker group is gone (or not there yet): the next Pong says when back
            self.on_lost(self, failed, message.message, message.retryable)
        elif isinstance(message, Pong):
            self.queue_size, self.batch_size, self.workers_ready = (message.queue_size, message.batch_size,
                                                                    message.workers_ready)
            self.on_report(self)
            future = self._pings.get(message.nonce)
            if future is not None and not future.done():
                future.set_result(message)

    def _fail_lost(self, _client: SchedulerClient, generations: list[Generation], message: str, _retryable: bool) -> None:
        for generation in generations:
            generation.fail(message)
            self.pool.close(generation.request_id)
        self.on_failed(message, generations)

    def _on_tokens(self, batch: TokenBatch) -> None:
        if batch.stats is not None:
            self.queue_size, self.batch_size = batch.stats.queue_size, batch.stats.running
            self.last_stats = batch.stats
            self.on_step(batch.stats)
            self.on_report(self)
        items = []
        for output in batch.outputs:
            generation = self.generations.get(output.request_id)
            if generation is None:
                continue
            if not output.tokens and output.stop_reason != StopReason.NOT_FINISHED:
                generation.queue_duration = output.queue_duration
                generation.finish_without_tokens(StopReason(output.stop_reason))
                self.finish(generation)
                continue
            item = generation.on_tokens(output)
            if item is not None:
                items.append(item)
        if items:
            self.pool.feed(items)

    def finish(self, generation: Generation) -> None:
        """A generation delivered its final event: forget it everywhere."""
        self.generations.pop(generation.request_id, None)
        self.pool.close(generation.request_id)
        self.on_finished(generation)


def make_gateway_id() -> str:
    """Unique per gateway process; prefixes its request ids."""
    return f"{socket.gethostname()}-{os.getpid()}-{int(time.time())}"
