"""Pipeline health as TGIS judges it, served on HTTP /health and as grpc.health.v1.

After a successful generation a cheap ping through the scheduler is enough;
at start-up or after a failure a real one-token generation ("liveness") must
pass through every service.
"""

from __future__ import annotations

import asyncio
import logging

from services.gateway.pb import generation_pb2 as pb

log = logging.getLogger(__name__)


class _ProbeContext:
    """The little of grpc.aio.ServicerContext that the servicer uses, for in-process probes."""

    async def abort(self, code, details: str):
        raise RuntimeError(f"{code.name}: {details}")


class HealthChecker:
    """Answers "can this pipeline generate right now?" with a reason when it cannot."""

    def __init__(self, servicer, timeout: float) -> None:
        self.servicer = servicer
        self.timeout = timeout
        self.last_generation_ok = False
        self._lock = asyncio.Lock()

    def record(self, ok: bool) -> None:
        self.last_generation_ok = ok

    async def check(self) -> tuple[bool, str]:
        servicer = self.servicer
        if servicer.draining:
            return False, "shutting down"
        if servicer.scheduler.info is None:
            return False, "model not loaded"
        if not servicer.pool.members:
            return False, "no tokenizer in the pool"
        try:
            async with self._lock:
                if self.last_generation_ok:
                    pong = await servicer.scheduler.ping(timeout=min(5.0, self.timeout))
                    return (True, "") if pong.workers_ready else (False, "workers not ready")
                await asyncio.wait_for(self._probe(), self.timeout)
                self.last_generation_ok = True
                return True, ""
        except TimeoutError:
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
        await self.servicer.generate_unlimited(request, _ProbeContext())
