"""Pipeline health as TGIS judges it, served on HTTP /health and as grpc.health.v1.

After a successful generation a cheap ping through the scheduler is enough;
at start-up or after a failure a real one-token generation ("liveness") must
pass through every service.  The probe's generation is not counted in the
request metrics (TGIS's probe goes to the shards directly).

`grpc.health.v1.Health/Check` for "" and "fmaas.GenerationService" runs the
same check (SERVING / NOT_SERVING); while draining it answers NOT_SERVING
without checking.  `Watch` reports the status of the last check.
"""

from __future__ import annotations

import asyncio
import copy
import logging
from collections.abc import Callable

from grpc_health.v1 import health, health_pb2

from services.gateway.metrics import NullMetrics
from services.gateway.pb import generation_pb2 as pb

log = logging.getLogger(__name__)

SERVICE_NAME = "fmaas.GenerationService"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class _ProbeContext:
    """The little of grpc.aio.ServicerContext that the servicer uses, for in-process probes."""

    async def abort(self, code, details: str):
        raise RuntimeError(f"{code.name}: {details}")


def quiet_copy(servicer):
    """The servicer with its metrics switched off, for the probe (it shares everything else, request ids too)."""
    probe = copy.copy(servicer)
    probe.metrics = NullMetrics()
    return probe


class HealthChecker:
    """Answers "can this pipeline generate right now?" with a reason when it cannot."""

    def __init__(self, servicer, timeout: float, probe_servicer=None) -> None:
        self.servicer = servicer
        self.probe_servicer = probe_servicer if probe_servicer is not None else servicer
        self.timeout = timeout
        self.last_generation_ok = False
        # Name of a gateway loop (tokenizer pool, scheduler connection) that has stopped, or None.
        self.dead_loop: Callable[[], str | None] = lambda: None
        self._lock = asyncio.Lock()

    def record(self, ok: bool) -> None:
        self.last_generation_ok = ok

    async def check(self) -> tuple[bool, str]:
        servicer = self.servicer
        if servicer.draining:
            return False, "shutting down"
        if dead := self.dead_loop():
            return False, f"the gateway's {dead} loop stopped"
        if not servicer.scheduler.reachable:
            return False, "scheduler not answering"
        if servicer.scheduler.info is None:
            return False, "model not loaded"
        if not servicer.pool.members:
            return False, "no tokenizer in the pool"
        try:
            async with self._lock:
                # The ping answers at once when the workers are gone; a probe would only wait in the queue.
                pong = await servicer.scheduler.ping(timeout=min(5.0, self.timeout))
                if not pong.workers_ready:
                    return False, "workers not ready"
                if self.last_generation_ok:
                    return True, ""
                await asyncio.wait_for(self._probe(), self.timeout)
                self.last_generation_ok = True
                return True, ""
        except TimeoutError:
            self.last_generation_ok = False
            return False, "Healthcheck timed-out"
        except Exception as exc:  # noqa: BLE001 - any failure is an unhealthy pipeline, reported with its reason
            log.warning("health check failed: %s", exc)
            self.last_generation_ok = False
            return False, "unhealthy"

    async def _probe(self) -> None:
        request = pb.BatchedGenerationRequest(
            requests=[pb.GenerationRequest(text="liveness")],
            params=pb.Parameters(stopping=pb.StoppingCriteria(max_new_tokens=1)),
        )
        # Goes around the concurrency limit, as TGIS's probe skips the queue.
        await self.probe_servicer.generate_unlimited(request, _ProbeContext())


class GrpcHealthServicer(health.aio.HealthServicer):
    """grpc.health.v1 whose Check asks the pipeline (the HealthChecker) rather than a stored flag."""

    def __init__(self) -> None:
        super().__init__()
        self.checker: HealthChecker | None = None
        self._server_status[SERVICE_NAME] = NOT_SERVING
        self._server_status[""] = NOT_SERVING

    async def Check(self, request: health_pb2.HealthCheckRequest, context):
        if self.checker is None or request.service not in ("", SERVICE_NAME) or self._gracefully_shutting_down:
            return await super().Check(request, context)
        ok, reason = await self.checker.check()
        status = SERVING if ok else NOT_SERVING
        if not ok:
            log.info("gRPC health check: NOT_SERVING (%s)", reason)
        await self.set("", status)
        await self.set(SERVICE_NAME, status)
        return health_pb2.HealthCheckResponse(status=status)
