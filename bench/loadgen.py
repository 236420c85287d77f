"""`tgis-bench`: benchmark TGIS-compatible servers on scenarios, beside transformers and llama.cpp, in one run.

Scenarios (`--scenario`): `short` prompts at each concurrency level; `prefix`, a long shared system prompt
with distinct questions sent one after another (TTFT of the first vs the repeats); `long` prompts at a fixed
concurrency; `interference`, one long prompt arriving while streams decode (their inter-token latency while
it is prefilled). Every request is a streamed greedy GenerateStream with min_new_tokens = max_new_tokens.
`--launch` starts each server configuration (`--server NAME:ARGS`) in turn; the baselines then run on the
same prompts (transformers static-batch generate() in fp32 and bf16, llama.cpp on one stream), and one
table gives our figures and the ratio to each baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shlex
import signal
import sys
from pathlib import Path

import grpc

from bench.compare import BASELINES, attach_ratios, run_baselines
from bench.driver import stream_one
from bench.launch import LaunchedServer
from bench.prompts import PromptFactory
from bench.report import header, quality_table, server_table, summary_table
from bench.scenarios import SCENARIOS, PromptBook, ScenarioRunner, cases
from bench.server_stats import scrape, step_costs, workers_memory
from services.common.model_path import DEMO_MODEL
from services.gateway.pb import generation_pb2_grpc

log = logging.getLogger("bench")

CONNECT_TIMEOUT_S = 30
QUALITY_FORMATS = "bf16,int8,int4"


def int_list(text: str) -> list[int]:
    values = [int(part) for part in text.split(",") if part.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("expected positive integers separated by commas, e.g. 1,8,32")
    return values


def name_list(choices: tuple[str, ...]):
    def parse(text: str) -> list[str]:
        names = [part.strip() for part in text.split(",") if part.strip()]
        unknown = sorted(set(names) - set(choices))
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(choices)} (comma-separated)")
        return names
    return parse


def server_config(text: str) -> tuple[str, list[str]]:
    """`NAME:ARGS` (ARGS split like a shell line) for --server."""
    name, sep, rest = text.partition(":")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError("expected NAME:ARGS, e.g. bf16:'--dtype-str bfloat16'")
    return name.strip(), shlex.split(rest)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tgis-bench", description=__doc__.splitlines()[0])
    target = parser.add_argument_group("server")
    target.add_argument("--address", default="localhost:8033", help="host:port of a running gRPC server")
    target.add_argument("--metrics-url", help="its /metrics URL, for the step costs (with --address)")
    target.add_argument("--tls-ca", help="CA certificate to verify the server (enables TLS)")
    target.add_argument("--tls-cert", help="client certificate (mTLS)")
    target.add_argument("--tls-key", help="client key (mTLS)")
    target.add_argument("--launch", action="store_true",
                        help="start text-generation-launcher on free ports for the run (ignores --address)")
    target.add_argument("--launcher-arg", action="append", default=[], metavar="ARG",
                        help="launcher argument(s) for every server, split like a shell line; repeatable")
    target.add_argument("--server", action="append", type=server_config, default=[], metavar="NAME:ARGS",
                        help="a server configuration to launch (repeatable), e.g. --server bf16:'--dtype-str bfloat16'")
    target.add_argument("--launch-timeout", type=float, default=300.0, help="seconds to wait for /health")
    target.add_argument("--launcher-log", type=Path, help="file for the launcher's output (default: a temp file)")

    load = parser.add_argument_group("scenarios")
    load.add_argument("--scenario", type=name_list(SCENARIOS), default=list(SCENARIOS),
                      help=f"scenarios to run, comma-separated (default: all of {','.join(SCENARIOS)})")
    load.add_argument("--concurrency", type=int_list, default=[1, 8, 32], help="short: levels, e.g. 1,8,32")
    amount = load.add_mutually_exclusive_group()
    amount.add_argument("--requests-per-level", type=int, help="short: requests per level (default 2x concurrency, >= 4)")
    amount.add_argument("--duration", type=float, help="short: seconds per level instead of a request count")
    load.add_argument("--input-tokens", type=int, default=32, help="short: prompt length in tokens")
    load.add_argument("--output-tokens", type=int, default=64, help="short, long: generated tokens per request")
    load.add_argument("--prefix-tokens", type=int, default=1000, help="prefix: shared system prompt length")
    load.add_argument("--prefix-requests", type=int, default=5, help="prefix: requests (the first, then repeats)")
    load.add_argument("--long-tokens", type=int, default=1500, help="long: prompt length in tokens")
    load.add_argument("--long-concurrency", type=int, default=8, help="long: requests, all at once")
    load.add_argument("--interference-tokens", type=int, default=2000, help="interference: the arriving prompt")
    load.add_argument("--interference-streams", type=int, default=16, help="interference: decoding streams")
    load.add_argument("--interference-stream-tokens", type=int, default=160,
                      help="interference: tokens per stream (enough to outlast the prompt's prefill)")
    load.add_argument("--request-timeout", type=float, default=600.0, help="gRPC deadline per request, seconds")
    load.add_argument("--warmup-requests", type=int, default=2,
                      help="untimed concurrent requests before the first scenario (0: none)")
    load.add_argument("--seed", type=int, default=0, help="seed of the prompt generator")

    base = parser.add_argument_group("baselines")
    base.add_argument("--model", default=DEMO_MODEL, help="hub id (local cache) or folder: served by --launch, "
                                                          "and loaded by the baselines")
    base.add_argument("--baselines", type=name_list(BASELINES), default=["transformers-fp32", "transformers-bf16",
                                                                         "llama.cpp"],
                      help=f"comma-separated, of {','.join(BASELINES)}")
    base.add_argument("--no-baseline", action="store_true", help="skip every baseline")
    base.add_argument("--gguf", type=Path, help="llama.cpp: GGUF file (default: the demo model's, from PyPI)")
    base.add_argument("--llama-threads", type=int, default=os.cpu_count() or 1, help="llama.cpp: CPU threads")

    parser.add_argument("--quality", nargs="?", const=QUALITY_FORMATS, metavar="FORMATS",
                        help=f"also measure greedy agreement and perplexity per weight format (default {QUALITY_FORMATS})")
    parser.add_argument("--json", type=Path, help="write all figures to this JSON file")
    args = parser.parse_args(argv)
    if args.requests_per_level is not None and args.requests_per_level < 1:
        parser.error("--requests-per-level must be at least 1")
    if min(args.input_tokens, args.output_tokens, args.prefix_tokens, args.long_tokens, args.long_concurrency,
           args.interference_tokens, args.interference_streams, args.interference_stream_tokens) < 1:
        parser.error("token counts, concurrency and stream counts must be at least 1")
    if args.prefix_requests < 2:
        parser.error("--prefix-requests must be at least 2 (the first and a repeat)")
    if args.server and not args.launch:
        parser.error("--server needs --launch")
    return args


def batch_needed(args: argparse.Namespace) -> int:
    """The running batch the selected scenarios fill: the highest concurrency they keep in flight."""
    needs = {"short": max(args.concurrency), "prefix": 1, "long": args.long_concurrency,
             "interference": args.interference_streams + 1}
    return max(needs[s] for s in args.scenario)


def servers(args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    """(name, launcher arguments) per server configuration; a batch as large as the scenarios need unless set."""
    common = [a for arg in args.launcher_arg for a in shlex.split(arg)]
    configs = [(name, common + extra) for name, extra in args.server] or [("ours", common)]
    return [(name, argv if "--max-batch-size" in argv else [*argv, "--max-batch-size", str(batch_needed(args))])
            for name, argv in configs]


def open_channel(address: str, args: argparse.Namespace) -> grpc.aio.Channel:
    if not args.tls_ca:
        return grpc.aio.insecure_channel(address)
    key = cert = None
    if args.tls_cert:
        cert, key = Path(args.tls_cert).read_bytes(), Path(args.tls_key).read_bytes()
    credentials = grpc.ssl_channel_credentials(Path(args.tls_ca).read_bytes(), key, cert)
    return grpc.aio.secure_channel(address, credentials)


async def drive_server(name: str, address: str, args: argparse.Namespace, book: PromptBook,
                       launcher_pid: int | None, metrics_url: str | None) -> dict:
    """Warm one server up, then run every selected scenario; the step costs and worker memory after each."""
    async with open_channel(address, args) as channel:
        try:
            await asyncio.wait_for(channel.channel_ready(), timeout=CONNECT_TIMEOUT_S)
        except TimeoutError:
            raise TimeoutError(f"no gRPC server answered at {address} in {CONNECT_TIMEOUT_S} s") from None
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        factory = PromptFactory(stub, args.input_tokens, seed=args.seed)
        await factory.calibrate()
        if args.warmup_requests > 0:
            log.info("%s: warm-up, %d concurrent request(s)", name, args.warmup_requests)
            prompts = await book.get("warmup", lambda: factory.build(args.warmup_requests))
            await asyncio.gather(*(stream_one(stub, p, args.output_tokens, args.request_timeout) for p in prompts))
        runner = ScenarioRunner(stub, factory, book, args, lambda text: log.info("%s: %s", name, text))
        results = []
        for scenario in args.scenario:
            before = scrape(metrics_url) if metrics_url else None
            result = await runner.run(scenario)
            after = scrape(metrics_url) if metrics_url else None
            result["step"] = step_costs(before, after) if before and after else None
            result["worker_memory"] = workers_memory(launcher_pid) if launcher_pid else None
            results.append(result)
        return {"server": name, "address": address, "scenarios": results}


def launcher_log(args: argparse.Namespace, name: str, count: int) -> Path | None:
    if not args.launcher_log or count == 1:
        return args.launcher_log
    return args.launcher_log.with_name(f"{args.launcher_log.stem}-{name}{args.launcher_log.suffix}")


def run_servers(args: argparse.Namespace, book: PromptBook) -> list[dict]:
    """Each server configuration in turn (launched and stopped when --launch), on the same prompts."""
    if not args.launch:
        return [asyncio.run(drive_server("ours", args.address, args, book, None, args.metrics_url))]
    results = []
    configs = servers(args)
    for name, argv in configs:
        server = LaunchedServer(args.model, argv, launcher_log(args, name, len(configs)),
                                host="localhost" if args.tls_ca else "127.0.0.1")
        try:
            server.start(args.launch_timeout)
        except (RuntimeError, TimeoutError) as exc:
            # One configuration that cannot start (say, a format this build lacks) leaves the others' figures.
            log.error("%s: server did not start: %s", name, exc)
            results.append({"server": name, "launcher_args": argv, "error": str(exc), "log": str(server.log_path),
                            "scenarios": []})
            continue
        try:
            result = asyncio.run(drive_server(name, server.address, args, book, server.pid, server.metrics_url))
        finally:
            server.stop()  # before the next server and the baselines, which then have the machine to themselves
        results.append({**result, "launcher_args": argv})
    if not any(result["scenarios"] for result in results):
        raise RuntimeError("no server configuration started")
    return results


def run_quality(args: argparse.Namespace) -> list[dict] | None:
    """The weight formats' quality figures (bench/quality.py); None when they cannot be taken."""
    try:
        from bench.quality import run_quality as measure
    except ImportError as exc:
        log.error("--quality skipped: %s", exc)
        return None
    formats = [f.strip() for f in args.quality.split(",") if f.strip()]
    try:
        return measure(args.model, formats, launcher_args=[a for arg in args.launcher_arg for a in shlex.split(arg)])
    except ValueError as exc:
        # Unknown format names: the figures already taken are still printed.
        log.error("--quality skipped: %s", exc)
        return None


def run_benchmark(args: argparse.Namespace) -> dict:
    """Every server on every scenario, then the baselines on the same prompts, then the ratios."""
    book = PromptBook()
    results = run_servers(args, book)
    baselines = {} if args.no_baseline else run_baselines(args.baselines, cases(args, book), args)
    attach_ratios(results, baselines)
    config = {key: value for key, value in vars(args).items() if key not in ("json", "launcher_log", "gguf")}
    output = {"config": {**config, "server": [name for name, _ in args.server]}, "servers": results,
              "baselines": baselines}
    if args.quality:
        output["quality"] = run_quality(args)
    return output


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    # SIGTERM unwinds like Ctrl-C, so a launched server is stopped on the way out.
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        results = run_benchmark(args)
    except (grpc.aio.AioRpcError, RuntimeError, TimeoutError, ValueError) as exc:
        log.error("benchmark failed: %s", exc)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(header(results["config"]))
    print(summary_table(results["servers"], results["baselines"]))
    print(server_table(results["servers"]))
    if results.get("quality"):
        print(quality_table(results["quality"]))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")
        log.info("figures written to %s", args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
