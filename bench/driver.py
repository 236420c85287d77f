"""Drive a server at a fixed concurrency with streamed greedy requests, timing every message."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import grpc

from bench.prompts import Prompt, PromptFactory
from bench.stats import RequestTiming, summarize_level
from services.gateway.pb import generation_pb2 as pb
from services.gateway.pb import generation_pb2_grpc


def generation_request(text: str, output_tokens: int) -> pb.SingleGenerationRequest:
    """A greedy request that must make exactly `output_tokens` tokens (min = max, so EOS cannot end it early)."""
    stopping = pb.StoppingCriteria(min_new_tokens=output_tokens, max_new_tokens=output_tokens)
    return pb.SingleGenerationRequest(request=pb.GenerationRequest(text=text),
                                      params=pb.Parameters(method=pb.GREEDY, stopping=stopping))


async def stream_one(stub: generation_pb2_grpc.GenerationServiceStub, prompt: Prompt, output_tokens: int,
                     timeout: float | None, timing: RequestTiming | None = None) -> RequestTiming:
    """Send one GenerateStream request and record each message's arrival; errors are recorded, not raised.

    Pass `timing` to watch the request's progress while it runs.
    """
    timing = timing or RequestTiming(sent=0.0)
    timing.sent = time.perf_counter()
    try:
        async for message in stub.GenerateStream(generation_request(prompt.text, output_tokens), timeout=timeout):
            timing.arrivals.append((time.perf_counter(), message.generated_token_count))
            timing.generated_tokens = max(timing.generated_tokens, message.generated_token_count)
    except grpc.aio.AioRpcError as exc:
        timing.error_code, timing.error_details = exc.code().name, exc.details() or ""
    timing.finished = time.perf_counter()
    if timing.ok and timing.generated_tokens != output_tokens:
        # min_new_tokens = max_new_tokens, so any other count is the server's fault.
        timing.error_code = "WRONG_TOKEN_COUNT"
        timing.error_details = f"expected {output_tokens} generated tokens, got {timing.generated_tokens}"
    return timing


@dataclass
class LevelRun:
    """The raw outcome of one level: every request's timing, the prompts used, and the wall-clock window."""

    concurrency: int
    timings: list[RequestTiming]
    prompts: list[Prompt]
    started: float
    ended: float

    def summary(self) -> dict:
        return summarize_level(self.concurrency, self.timings, self.started, self.ended)


class PromptQueue:
    """Hands out prompts in order; in duration mode it builds more (outside any request's timing) when empty."""

    def __init__(self, factory: PromptFactory, prompts: list[Prompt], refill: int) -> None:
        self.factory, self.pending, self.refill = factory, list(prompts), refill
        self.used: list[Prompt] = []
        self._lock = asyncio.Lock()

    async def next(self) -> Prompt:
        async with self._lock:
            if not self.pending:
                self.pending = await self.factory.build(self.refill)
            prompt = self.pending.pop(0)
            self.used.append(prompt)
            return prompt


async def run_level(stub: generation_pb2_grpc.GenerationServiceStub, queue: PromptQueue, concurrency: int,
                    output_tokens: int, requests: int | None, duration: float | None,
                    timeout: float | None) -> LevelRun:
    """Keep `concurrency` requests in flight until `requests` were sent or `duration` seconds passed."""
    timings: list[RequestTiming] = []
    sent = 0
    started = time.perf_counter()
    deadline = started + duration if duration else None

    def may_send() -> bool:
        nonlocal sent
        if deadline is not None:
            return time.perf_counter() < deadline
        sent += 1
        return sent <= (requests or 0)

    async def client() -> None:
        while may_send():
            timings.append(await stream_one(stub, await queue.next(), output_tokens, timeout))

    await asyncio.gather(*(client() for _ in range(concurrency)))
    return LevelRun(concurrency, timings, queue.used, started, time.perf_counter())
