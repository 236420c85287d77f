"""`tgis-bench`: load-test a TGIS-compatible server at fixed concurrency levels, against a transformers baseline.

For each concurrency level it streams greedy requests of a fixed input and output length and reports
requests/s, generated tokens/s, time to first token and inter-token latency percentiles and errors; then
it times plain transformers `generate()` on the same model and prompts, batched at the level's
concurrency, and reports the ratio of the two throughputs. `--launch` starts the server itself.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import shlex
import sys
from pathlib import Path

import grpc
import torch

from bench.baseline import Baseline
from bench.driver import LevelRun, run_level, stream_one
from bench.launch import LaunchedServer
from bench.prompts import PromptFactory
from bench.report import header, table
from services.common.model_path import DEMO_MODEL, ModelNotFoundError, resolve_model_path
from services.gateway.pb import generation_pb2_grpc

log = logging.getLogger("bench")

CONNECT_TIMEOUT_S = 30
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def concurrency_list(text: str) -> list[int]:
    levels = [int(part) for part in text.split(",") if part.strip()]
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError("expected positive integers separated by commas, e.g. 1,4,16")
    return levels


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tgis-bench", description=__doc__.splitlines()[0])
    target = parser.add_argument_group("server")
    target.add_argument("--address", default="localhost:8033", help="host:port of a running gRPC server")
    target.add_argument("--tls-ca", help="CA certificate to verify the server (enables TLS)")
    target.add_argument("--tls-cert", help="client certificate (mTLS)")
    target.add_argument("--tls-key", help="client key (mTLS)")
    target.add_argument("--launch", action="store_true",
                        help="start text-generation-launcher on free ports for the run (ignores --address)")
    target.add_argument("--launcher-arg", action="append", default=[], metavar="ARG",
                        help="extra launcher argument(s), split like a shell line; repeatable, "
                             "e.g. --launcher-arg='--max-batch-size 16'")
    target.add_argument("--launch-timeout", type=float, default=300.0, help="seconds to wait for /health")
    target.add_argument("--launcher-log", type=Path, help="file for the launcher's output (default: a temp file)")

    load = parser.add_argument_group("load")
    load.add_argument("--concurrency", type=concurrency_list, default=[1, 4, 16], help="levels, e.g. 1,4,16")
    amount = load.add_mutually_exclusive_group()
    amount.add_argument("--requests-per-level", type=int, help="requests per level (default 2x concurrency, >= 4)")
    amount.add_argument("--duration", type=float, help="seconds per level instead of a request count")
    load.add_argument("--input-tokens", type=int, default=32, help="prompt length in tokens")
    load.add_argument("--output-tokens", type=int, default=32, help="generated tokens per request (min = max)")
    load.add_argument("--request-timeout", type=float, default=600.0, help="gRPC deadline per request, seconds")
    load.add_argument("--warmup-requests", type=int, default=2,
                      help="untimed concurrent requests before the first level (0: none)")
    load.add_argument("--seed", type=int, default=0, help="seed of the prompt generator")

    base = parser.add_argument_group("baseline")
    base.add_argument("--model", default=DEMO_MODEL, help="hub id (local cache) or folder: served by --launch, "
                                                          "and loaded for the baseline")
    base.add_argument("--no-baseline", action="store_true", help="skip the transformers baseline")
    base.add_argument("--baseline-dtype", choices=sorted(DTYPES),
                      help="baseline weights dtype (default: the server's, float32 on CPU, float16 on GPU)")

    parser.add_argument("--json", type=Path, help="write all figures to this JSON file")
    args = parser.parse_args(argv)
    if args.requests_per_level is not None and args.requests_per_level < 1:
        parser.error("--requests-per-level must be at least 1")
    if args.input_tokens < 1 or args.output_tokens < 1:
        parser.error("--input-tokens and --output-tokens must be at least 1")
    return args


def requests_for(args: argparse.Namespace, concurrency: int) -> int | None:
    """Requests for one level: the given count, else 2x concurrency (at least 4); None in duration mode."""
    if args.duration:
        return None
    return args.requests_per_level or max(2 * concurrency, 4)


def open_channel(address: str, args: argparse.Namespace) -> grpc.aio.Channel:
    if not args.tls_ca:
        return grpc.aio.insecure_channel(address)
    key = cert = None
    if args.tls_cert:
        cert, key = Path(args.tls_cert).read_bytes(), Path(args.tls_key).read_bytes()
    credentials = grpc.ssl_channel_credentials(Path(args.tls_ca).read_bytes(), key, cert)
    return grpc.aio.secure_channel(address, credentials)


async def drive_server(address: str, args: argparse.Namespace) -> list[LevelRun]:
    """Build prompts with the server's tokenizer, warm the server up, then run every concurrency level."""
    async with open_channel(address, args) as channel:
        try:
            await asyncio.wait_for(channel.channel_ready(), timeout=CONNECT_TIMEOUT_S)
        except TimeoutError:
            raise TimeoutError(f"no gRPC server answered at {address} in {CONNECT_TIMEOUT_S} s") from None
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        factory = PromptFactory(stub, args.input_tokens, seed=args.seed)
        await factory.calibrate()
        await warm_up(stub, factory, args)
        runs = []
        for concurrency in args.concurrency:
            runs.append(await run_one_level(stub, factory, concurrency, args))
        return runs


async def warm_up(stub: generation_pb2_grpc.GenerationServiceStub, factory: PromptFactory,
                  args: argparse.Namespace) -> None:
    """Untimed concurrent requests first: a server's first forward passes (and batch shapes) are slower."""
    if args.warmup_requests < 1:
        return
    log.info("warm-up: %d concurrent request(s)", args.warmup_requests)
    prompts = await factory.build(args.warmup_requests)
    timings = await asyncio.gather(*(stream_one(stub, p, args.output_tokens, args.request_timeout) for p in prompts))
    for timing in timings:
        if not timing.ok:
            log.warning("warm-up request failed: %s: %s", timing.error_code, timing.error_details)


async def run_one_level(stub: generation_pb2_grpc.GenerationServiceStub, factory: PromptFactory, concurrency: int,
                        args: argparse.Namespace) -> LevelRun:
    count = requests_for(args, concurrency)
    amount = f"{args.duration} s" if count is None else f"{count} requests"
    log.info("level concurrency=%d started (%s)", concurrency, amount)
    run = await run_level(stub, factory, concurrency, args.output_tokens, count, args.duration, args.request_timeout)
    summary = run.summary()
    log.info("level concurrency=%d finished: %d/%d ok in %.1f s, %.1f tok/s", concurrency, summary["completed"],
             summary["requests"], summary["duration_s"], summary["tokens_per_s"])
    return run


def run_baselines(args: argparse.Namespace, runs: list[LevelRun], levels: list[dict]) -> None:
    """Time transformers generate() per level on that level's prompts and attach figures and ratio to `levels`."""
    model_path = resolve_model_path(args.model)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = DTYPES[args.baseline_dtype] if args.baseline_dtype else torch.float16 if device == "cuda" else torch.float32
    log.info("baseline: loading %s (%s on %s)", model_path, dtype, device)
    baseline = Baseline(model_path, dtype, device)
    baseline.warm_up(runs[0].prompts[:2])
    for run, level in zip(runs, levels, strict=True):
        log.info("baseline concurrency=%d started (%d prompts)", run.concurrency, len(run.prompts))
        figures = baseline.run(run.prompts, run.concurrency, args.output_tokens, args.duration)
        figures["ratio"] = level["tokens_per_s"] / figures["tokens_per_s"] if figures["tokens_per_s"] else None
        level["baseline"] = figures
        log.info("baseline concurrency=%d finished: %.1f tok/s", run.concurrency, figures["tokens_per_s"])


def run_benchmark(args: argparse.Namespace) -> dict:
    """Run the server levels (starting the server if asked, and stopping it before the baseline), then the baseline."""
    server = LaunchedServer(args.model, [a for arg in args.launcher_arg for a in shlex.split(arg)], args.launcher_log,
                            host="localhost" if args.tls_ca else "127.0.0.1") if args.launch else None
    try:
        address = server.start(args.launch_timeout).address if server else args.address
        runs = asyncio.run(drive_server(address, args))
    finally:
        if server:
            server.stop()  # before the baseline, which then has the machine to itself
    levels = [run.summary() for run in runs]
    if not args.no_baseline:
        try:
            run_baselines(args, runs, levels)
        except ModelNotFoundError as exc:
            # The server's figures are still worth printing.
            log.error("baseline skipped: %s (point --model at the served model's folder, or use --no-baseline)", exc)
    config = {"address": address, "launched": args.launch, "model": args.model, "input_tokens": args.input_tokens,
              "output_tokens": args.output_tokens, "concurrency": args.concurrency, "duration": args.duration,
              "requests_per_level": args.requests_per_level, "warmup_requests": args.warmup_requests,
              "launcher_args": args.launcher_arg}
    return {"config": config, "levels": levels}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    try:
        results = run_benchmark(args)
    except (grpc.aio.AioRpcError, RuntimeError, TimeoutError, ValueError) as exc:
        log.error("benchmark failed: %s", exc)
        return 1
    print(header(results["config"]))
    print(table(results["levels"]))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        log.info("figures written to %s", args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
