"""The benchmark's scenarios against one server: the load each one sends and the figures it reports."""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from bench.driver import PromptQueue, run_level, stream_one
from bench.prompts import Prompt, PromptFactory
from bench.stats import RequestTiming, percentiles, summarize_level
from services.gateway.pb import generation_pb2_grpc

SCENARIOS = ("short", "prefix", "long", "interference")
# Only the first token of a prefix request or of the interfering prompt is measured; a few more show it goes on.
PROBE_OUTPUT_TOKENS = 4
QUESTION_WORDS = 16
# The interfering prompt is sent once every stream has this many tokens, so all of them are decoding.
WARM_TOKENS = 4
WARM_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class Case:
    """One measured case of a scenario, as the baselines replay it: the same prompts, batch and output length.

    `measure` says what the ratio compares: "throughput" (tokens/s) or "ttft" (time to the first token).
    """

    scenario: str
    name: str
    prompts: tuple[Prompt, ...]
    batch_size: int
    output_tokens: int
    measure: str


class PromptBook:
    """Prompts built once (with the first server's Tokenize) and reused, so every server and baseline sees the same."""

    def __init__(self) -> None:
        self.prompts: dict[str, list[Prompt]] = {}

    async def get(self, key: str, build: Callable[[], Awaitable[list[Prompt]]]) -> list[Prompt]:
        if key not in self.prompts:
            self.prompts[key] = await build()
        return self.prompts[key]


def requests_for(args: argparse.Namespace, concurrency: int) -> int | None:
    """Requests for one short-prompt level: the given count, else 2x concurrency (at least 4); None in duration mode."""
    if args.duration:
        return None
    return args.requests_per_level or max(2 * concurrency, 4)


def cases(args: argparse.Namespace, book: PromptBook) -> list[Case]:
    """The baseline cases of the scenarios that ran, in the order they ran (llama.cpp's prefix reuse relies on it)."""
    found: list[Case] = []
    for scenario in args.scenario:
        if scenario == "short":
            found += [Case("short", f"conc {c}", tuple(book.prompts[f"short-{c}"]), c, args.output_tokens,
                           "throughput") for c in args.concurrency]
        elif scenario == "prefix":
            first, *repeats = book.prompts["prefix"]
            found += [Case("prefix", "first", (first,), 1, PROBE_OUTPUT_TOKENS, "ttft"),
                      Case("prefix", "repeat", tuple(repeats), 1, PROBE_OUTPUT_TOKENS, "ttft")]
        elif scenario == "long":
            found.append(Case("long", f"conc {args.long_concurrency}", tuple(book.prompts["long"]),
                              args.long_concurrency, args.output_tokens, "throughput"))
    return found  # interference has no baseline: a static batch cannot take a prompt mid-generation


class ScenarioRunner:
    """Runs scenarios against one server (a gRPC stub); prompts come from the shared book."""

    def __init__(self, stub: generation_pb2_grpc.GenerationServiceStub, factory: PromptFactory, book: PromptBook,
                 args: argparse.Namespace, log: Callable[[str], None]) -> None:
        self.stub, self.factory, self.book, self.args, self.log = stub, factory, book, args, log

    async def run(self, scenario: str) -> dict:
        """One scenario's rows (one per case) and its headline figures."""
        return await getattr(self, scenario)()

    async def _stream(self, prompt: Prompt, output_tokens: int, timing: RequestTiming | None = None) -> RequestTiming:
        return await stream_one(self.stub, prompt, output_tokens, self.args.request_timeout, timing)

    async def short(self) -> dict:
        """Short prompts at each concurrency level, every request making exactly --output-tokens tokens."""
        rows = []
        for concurrency in self.args.concurrency:
            count = requests_for(self.args, concurrency)
            prompts = await self.book.get(f"short-{concurrency}", lambda n=count or 4 * concurrency: self.factory.build(n))
            queue = PromptQueue(self.factory, prompts, refill=4 * concurrency)
            self.log(f"short: concurrency {concurrency}, " + (f"{count} requests" if count else f"{self.args.duration} s"))
            run = await run_level(self.stub, queue, concurrency, self.args.output_tokens, count, self.args.duration,
                                  self.args.request_timeout)
            rows.append({"case": f"conc {concurrency}", **run.summary()})
        return {"scenario": "short", "rows": rows, "figures": {}}

    async def prefix(self) -> dict:
        """A shared system prompt + distinct questions, sent one after another: TTFT of the first vs the repeats."""
        length = self.args.prefix_tokens

        async def build() -> list[Prompt]:
            shared = (await self.factory.build(1, length))[0]
            return await self.factory.build_with_prefix(shared, self.args.prefix_requests, QUESTION_WORDS)

        prompts = await self.book.get("prefix", build)
        # An unrelated prompt as long first: the server's first long forward pass pays one-off costs.
        warm = await self.book.get("prefix-warm", lambda: self.factory.build(1, len(prompts[0].tokens)))
        await self._stream(warm[0], PROBE_OUTPUT_TOKENS)
        self.log(f"prefix: {len(prompts)} requests sharing a {length}-token prefix, one at a time")
        started = time.perf_counter()
        timings = [await self._stream(prompt, PROBE_OUTPUT_TOKENS) for prompt in prompts]
        ended = time.perf_counter()
        first, repeats = summarize_level(1, timings[:1], started, ended), summarize_level(1, timings[1:], started, ended)
        ratio = None
        if first["ttft_s"]["p50"] and repeats["ttft_s"]["p50"] is not None:
            ratio = repeats["ttft_s"]["p50"] / first["ttft_s"]["p50"]
        # Sequential probes: their tokens/s says nothing, their TTFT is the figure.
        rows = [{"case": case, **figures, "tokens_per_s": None} for case, figures in (("first", first),
                                                                                       ("repeat", repeats))]
        return {"scenario": "prefix", "rows": rows,
                "figures": {"prefix_tokens": length, "repeat_over_first_ttft": ratio}}

    async def long(self) -> dict:
        """Long prompts, one wave at --long-concurrency."""
        concurrency = self.args.long_concurrency
        prompts = await self.book.get("long", lambda: self.factory.build(concurrency, self.args.long_tokens))
        self.log(f"long: {len(prompts)} prompts of {self.args.long_tokens} tokens at concurrency {concurrency}")
        run = await run_level(self.stub, PromptQueue(self.factory, prompts, refill=concurrency), concurrency,
                              self.args.output_tokens, len(prompts), None, self.args.request_timeout)
        return {"scenario": "long", "rows": [{"case": f"conc {concurrency}", **run.summary()}], "figures": {}}

    async def interference(self) -> dict:
        """One long prompt arriving while streams decode: the streams' inter-token latency while it is prefilled."""
        streams, length = self.args.interference_streams, self.args.interference_tokens
        stream_prompts = await self.book.get("interference-streams", lambda: self.factory.build(streams))
        intruder = (await self.book.get("interference-prompt", lambda: self.factory.build(1, length)))[0]
        self.log(f"interference: a {length}-token prompt while {streams} streams decode")
        timings = [RequestTiming(sent=0.0) for _ in stream_prompts]
        started = time.perf_counter()
        tasks = [asyncio.create_task(self._stream(p, self.args.interference_stream_tokens, t))
                 for p, t in zip(stream_prompts, timings, strict=True)]
        await self._until_decoding(timings, tasks)
        prompt_timing = await self._stream(intruder, PROBE_OUTPUT_TOKENS)
        await asyncio.gather(*tasks)
        ended = time.perf_counter()
        summary = summarize_level(streams, timings, started, ended)
        window = (prompt_timing.sent, prompt_timing.first_token_at() or prompt_timing.finished or ended)
        in_window = [v for t in timings if t.ok for v in t.inter_token_latencies(during=window)]
        window_itl = percentiles(in_window)
        still_running = all(t.finished is not None and t.finished > window[1] for t in timings)
        figures = {"window_s": window[1] - window[0], "window_itl_s": window_itl, "window_samples": len(in_window),
                   "window_p99_over_p50": _ratio(window_itl["p99"], window_itl["p50"]),
                   "window_p99_over_run_p50": _ratio(window_itl["p99"], summary["itl_s"]["p50"]),
                   "streams_outlasted_prefill": still_running}
        if not still_running:
            self.log("interference: some streams ended before the prompt's first token; "
                     "raise --interference-stream-tokens")
        prompt_row = summarize_level(1, [prompt_timing], prompt_timing.sent, prompt_timing.finished or ended)
        return {"scenario": "interference",
                "rows": [{"case": f"{streams} streams", **summary, "window_itl_s": window_itl},
                         {"case": f"{length}-token prompt", **prompt_row}],
                "figures": figures}

    async def _until_decoding(self, timings: list[RequestTiming], tasks: list[asyncio.Task]) -> None:
        """Wait until every stream has WARM_TOKENS tokens (or ended: its error then shows in the figures)."""
        deadline = time.perf_counter() + WARM_TIMEOUT_S
        while time.perf_counter() < deadline:
            if all(t.done() or timing.generated_tokens >= WARM_TOKENS for t, timing in zip(tasks, timings, strict=True)):
                return
            await asyncio.sleep(0.005)


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    return numerator / denominator if numerator is not None and denominator else None
