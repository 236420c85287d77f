"""The gateway process: gRPC server (8033), HTTP /health and /metrics (3000), pipeline sockets.

Start-up: bind the tokenizer pool socket, connect to every replica's
scheduler (replicas.py), open the HTTP port (`/live` at once; `/health` 503
and `/metrics` empty until the model info arrives), wait for the first
replica's model info, then serve gRPC.  SIGTERM drains:
health turns 503, new calls get UNAVAILABLE, in-flight calls get
`drain_grace_period` seconds to finish.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
from pathlib import Path
from typing import NoReturn

import grpc
import zmq.asyncio
from aiohttp import web
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common import links
from services.common.gc_freeze import freeze_start_up_objects
from services.common.logs import setup_logging
from services.gateway.adapters import AdapterLookup
from services.gateway.config import GatewayConfig
from services.gateway.health import GrpcHealthServicer, HealthChecker, quiet_copy
from services.gateway.interceptors import SERVICE_NAME, DecodeErrorInterceptor, DrainInterceptor
from services.gateway.metrics import CONTENT_TYPE, GatewayMetrics
from services.gateway.pb import generation_pb2_grpc
from services.gateway.prefixes import PrefixLookup
from services.gateway.replicas import ReplicaSet
from services.gateway.scheduler_client import make_gateway_id
from services.gateway.servicer import MAX_SEND_MESSAGE_BYTES, GenerationServicer
from services.gateway.tls import tls_files_error
from services.gateway.tokenizer_pool import TokenizerPool

log = logging.getLogger(__name__)



def _fail(message: str) -> NoReturn:
    """A start-up error: logged (so it reaches the launcher's log) and exit status 1."""
    log.error(message)
    raise SystemExit(1)


def _load_pem(path: str, name: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        _fail(f"couldn't load {name} from {path}: {exc}")


def tls_credentials(config: GatewayConfig) -> grpc.ServerCredentials | None:
    """Server credentials from the TLS paths; a client CA makes client certificates required (mTLS)."""
    error = tls_files_error(config.tls_cert_path, config.tls_key_path, config.tls_client_ca_cert_path)
    if error:
        _fail(error)
    if not config.tls_cert_path:
        return None
    cert = _load_pem(config.tls_cert_path, "cert")
    key = _load_pem(config.tls_key_path, "key")
    if config.tls_client_ca_cert_path:
        ca = _load_pem(config.tls_client_ca_cert_path, "client ca cert")
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
        self.scheduler = ReplicaSet(self.ctx, config.scheduler_endpoint, make_gateway_id(), self.pool,
                                    links.settings().discovery_interval)
        self.health_servicer = GrpcHealthServicer()
        self.servicer: GenerationServicer | None = None
        self.health: HealthChecker | None = None
        self.metrics: GatewayMetrics | None = None
        self.stop_requested = asyncio.Event()

    async def run(self) -> None:
        self.loops = {"tokenizer pool": asyncio.create_task(self.pool.run()),
                      "replica connections": asyncio.create_task(self.scheduler.run())}
        for name, task in self.loops.items():
            task.add_done_callback(lambda done, name=name: self._loop_ended(name, done))
        tasks = list(self.loops.values())
        runner = await self._start_http()
        log.info("waiting for the scheduler at %s (tokenizers join at %s)", self.config.scheduler_endpoint,
                 self.config.tokenizer_endpoint)
        ready = asyncio.create_task(self.scheduler.ready.wait())
        stop = asyncio.create_task(self.stop_requested.wait())
        await asyncio.wait({ready, stop}, return_when=asyncio.FIRST_COMPLETED)
        if self.stop_requested.is_set():
            log.info("stopped before the pipeline was ready")
            for task in [*tasks, ready]:
                task.cancel()
            await runner.cleanup()
            links.stop_authenticators()
            self.ctx.destroy(linger=0)
            return
        model = self.scheduler.info.model
        self.metrics = GatewayMetrics(model.max_sequence_length, model.max_new_tokens, model.max_batch_size)
        self.servicer = GenerationServicer(
            self.scheduler, self.pool, self.metrics,
            max_concurrent_requests=self.config.max_concurrent_requests,
            default_include_stop_seqs=self.config.default_include_stop_seqs,
            output_special_tokens=self.config.output_special_tokens,
            prefixes=PrefixLookup.open(self.config.prefix_store_path, self.config.prompt_cache_size_mb,
                                       self.config.max_prompt_prefix_length, model, self.metrics),
            adapters=AdapterLookup(self.config.adapter_cache),
        )
        self.health = HealthChecker(self.servicer, self.config.health_timeout)
        self.health.dead_loop = self._dead_loop
        self.servicer.on_generation_result = self.health.record
        # The probe's generation is not a client request: it is not counted in the metrics.
        self.health.probe_servicer = quiet_copy(self.servicer)
        self.health_servicer.checker = self.health
        freeze_start_up_objects()
        metrics = self.metrics
        self.scheduler.on_step = metrics.record_step
        self.scheduler.on_failed = metrics.record_step_failure
        self.scheduler.on_finished = metrics.record_finished
        self.scheduler.on_batch_gauges = metrics.set_batch_gauges
        self.scheduler.on_replica = metrics.set_replica
        self.scheduler.on_routed = metrics.replica_routed
        self.pool.on_handled = metrics.tokenizer_handled_one
        self.pool.on_membership_change = lambda: metrics.set_tokenizers([m.name for m in self.pool.members.values()])
        self.pool.on_membership_change()

        server = await self._start_grpc()
        await self.stop_requested.wait()
        await self._drain(server)
        await runner.cleanup()
        for task in tasks:
            task.cancel()
        links.stop_authenticators()
        self.ctx.destroy(linger=0)

    def _dead_loop(self) -> str | None:
        return next((name for name, task in self.loops.items() if task.done()), None)

    @staticmethod
    def _loop_ended(name: str, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("the %s loop stopped: %r; health reports it until a restart", name, task.exception())

    async def _start_grpc(self) -> grpc.aio.Server:
        options = [
            ("grpc.max_receive_message_length", self.config.max_message_bytes),
            ("grpc.max_send_message_length", MAX_SEND_MESSAGE_BYTES),
        ]
        interceptors = [DrainInterceptor(lambda: self.servicer.draining), DecodeErrorInterceptor()]
        server = grpc.aio.server(options=options, interceptors=interceptors)
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
        app.router.add_get("/live", self._live)
        app.router.add_get("/health", self._health)
        app.router.add_get("/metrics", self._metrics)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, self.config.host, self.config.port).start()
        log.info("HTTP /health and /metrics on %s:%d", self.config.host, self.config.port)
        return runner

    async def _live(self, _request: web.Request) -> web.Response:
        """The process serves: 200 whatever the other services do (and while draining); 503 if a loop of ours died."""
        if dead := self._dead_loop():
            return self._unhealthy(f"the gateway's {dead} loop stopped")
        return web.Response(status=200)

    async def _health(self, _request: web.Request) -> web.Response:
        if self.health is None:
            return self._unhealthy("model not loaded")
        ok, reason = await self.health.check()
        if ok:
            return web.Response(status=200)
        return self._unhealthy(reason)

    @staticmethod
    def _unhealthy(reason: str) -> web.Response:
        return web.Response(status=503, text=json.dumps({"error": reason}), content_type="application/json")

    async def _metrics(self, _request: web.Request) -> web.Response:
        # The histograms' buckets come from the model's limits: nothing to show before they are known.
        body = self.metrics.render() if self.metrics is not None else b""
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

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
    config = links.parse_with_links(GatewayConfig, argv, "gRPC gateway of the TGIS-compatible pipeline.")
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
