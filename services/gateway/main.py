"""The gateway process: gRPC server (8033), HTTP /health and /metrics (3000), pipeline sockets.

Start-up: bind the tokenizer pool socket, connect to the scheduler, wait for
the model info, then serve.  SIGTERM drains: health turns 503, new calls get
UNAVAILABLE, in-flight calls get `drain_grace_period` seconds to finish.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
from pathlib import Path

import grpc
import zmq.asyncio
from aiohttp import web
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from services.common.config import parse_config
from services.common.logs import setup_logging
from services.gateway.config import GatewayConfig
from services.gateway.health import HealthChecker
from services.gateway.metrics import GatewayMetrics
from services.gateway.pb import generation_pb2_grpc
from services.gateway.scheduler_client import SchedulerClient, make_gateway_id
from services.gateway.servicer import GenerationServicer
from services.gateway.tokenizer_pool import TokenizerPool

log = logging.getLogger(__name__)

SERVICE_NAME = "fmaas.GenerationService"


def tls_credentials(config: GatewayConfig) -> grpc.ServerCredentials | None:
    """Server credentials from the TLS paths, with TGIS's start-up errors for half-given settings."""
    if bool(config.tls_cert_path) != bool(config.tls_key_path):
        raise SystemExit("tls: must provide both cert and key")
    if config.tls_client_ca_cert_path and not config.tls_cert_path:
        raise SystemExit("tls: cannot provide client ca cert without keypair")
    if not config.tls_cert_path:
        return None
    key = Path(config.tls_key_path).read_bytes()
    cert = Path(config.tls_cert_path).read_bytes()
    if config.tls_client_ca_cert_path:
        ca = Path(config.tls_client_ca_cert_path).read_bytes()
        return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=True)
    return grpc.ssl_server_credentials([(key, cert)])


class Gateway:
    """Wires the servicer, the pipeline connections and the two servers together."""

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.credentials = tls_credentials(config)
        self.ctx = zmq.asyncio.Context()
        self.pool = TokenizerPool(self.ctx, config.tokenizer_endpoint, config.tokenizer_heartbeat_timeout,
                                  config.tokenizer_wait_timeout)
        self.scheduler = SchedulerClient(self.ctx, config.scheduler_endpoint, make_gateway_id(), self.pool)
        self.health_servicer = health.aio.HealthServicer()
        self.stop_requested = asyncio.Event()

    async def run(self) -> None:
        tasks = [asyncio.create_task(self.pool.run()), asyncio.create_task(self.scheduler.run())]
        log.info("waiting for the scheduler at %s (tokenizers join at %s)", self.config.scheduler_endpoint,
                 self.config.tokenizer_endpoint)
        ready = asyncio.create_task(self.scheduler.ready.wait())
        stop = asyncio.create_task(self.stop_requested.wait())
        await asyncio.wait({ready, stop}, return_when=asyncio.FIRST_COMPLETED)
        if self.stop_requested.is_set():
            log.info("stopped before the pipeline was ready")
            for task in [*tasks, ready]:
                task.cancel()
            self.ctx.destroy(linger=0)
            return
        model = self.scheduler.info.model
        self.metrics = GatewayMetrics(model.max_sequence_length, model.max_new_tokens, model.max_batch_size)
        self.servicer = GenerationServicer(
            self.scheduler, self.pool, self.metrics,
            max_concurrent_requests=self.config.max_concurrent_requests,
            default_include_stop_seqs=self.config.default_include_stop_seqs,
            output_special_tokens=self.config.output_special_tokens,
        )
        self.health = HealthChecker(self.servicer, self.config.health_timeout)
        self.servicer.on_generation_result = self.health.record
        self.scheduler.on_step = self.metrics.record_step
        self.pool.on_membership_change = lambda: self.metrics.tokenizer_pool_size.set(len(self.pool.members))
        self.metrics.tokenizer_pool_size.set(len(self.pool.members))

        server = await self._start_grpc()
        runner = await self._start_http()
        await self.stop_requested.wait()
        await self._drain(server)
        await runner.cleanup()
        for task in tasks:
            task.cancel()
        self.ctx.destroy(linger=0)

    async def _start_grpc(self) -> grpc.aio.Server:
        options = [
            ("grpc.max_receive_message_length", self.config.max_message_bytes),
            ("grpc.max_send_message_length", 64 * 1024 * 1024),
        ]
        server = grpc.aio.server(options=options)
        generation_pb2_grpc.add_GenerationServiceServicer_to_server(self.servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health_servicer, server)
        address = f"{self.config.host}:{self.config.grpc_port}"
        if self.credentials is None:
            server.add_insecure_port(address)
        else:
            server.add_secure_port(address, self.credentials)
        await server.start()
        await self.health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        await self.health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        log.info("gRPC server listening on %s (%s)", address, "TLS" if self.credentials else "plaintext")
        return server

    async def _start_http(self) -> web.AppRunner:
        app = web.Application()
        app.router.add_get("/health", self._health)
        app.router.add_get("/metrics", self._metrics)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, self.config.host, self.config.port).start()
        log.info("HTTP /health and /metrics on %s:%d", self.config.host, self.config.port)
        return runner

    async def _health(self, _request: web.Request) -> web.Response:
        ok, reason = await self.health.check()
        if ok:
            return web.Response(status=200)
        return web.Response(status=503, text=json.dumps({"error": reason}), content_type="application/json")

    async def _metrics(self, _request: web.Request) -> web.Response:
        body = generate_latest(self.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _drain(self, server: grpc.aio.Server) -> None:
        grace = self.config.drain_grace_period
        in_flight = self.servicer.limiter.in_use
        log.info("draining: refusing new calls, %d input(s) in flight get up to %.0f s", in_flight, grace)
        self.servicer.draining = True
        await self.health_servicer.enter_graceful_shutdown()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while self.servicer.limiter.in_use and loop.time() < deadline:
            await asyncio.sleep(0.05)
        if self.servicer.limiter.in_use:
            log.warning("grace period over with %d input(s) unfinished", self.servicer.limiter.in_use)
        await server.stop(grace=1.0)
        log.info("gateway stopped")


def main(argv: list[str] | None = None) -> int:
    setup_logging("gateway")
    config = parse_config(GatewayConfig, argv, "gRPC gateway of the TGIS-compatible pipeline.")
    gateway = Gateway(config)

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, gateway.stop_requested.set)
        await gateway.run()

    asyncio.run(serve())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
