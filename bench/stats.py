"""Per-request timings of streamed generations and their per-level summary (rates, percentiles, errors)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

PERCENTILES = (50, 90, 99)


@dataclass
class RequestTiming:
    """What one streamed request saw: when it was sent, when messages arrived, how it ended."""

    sent: float
    arrivals: list[tuple[float, int]] = field(default_factory=list)  # (arrival time, generated_token_count)
    finished: float | None = None
    generated_tokens: int = 0
    error_code: str | None = None
    error_details: str = ""

    @property
    def ok(self) -> bool:
        return self.error_code is None

    def ttft(self) -> float | None:
        """Seconds from sending to the first message that carries a generated token."""
        first = self.first_token_at()
        return None if first is None else first - self.sent

    def token_gaps(self) -> list[tuple[float, float, int]]:
        """(previous arrival, arrival, tokens it brought) for each message that raised the token count after the first."""
        gaps: list[tuple[float, float, int]] = []
        previous: tuple[float, int] | None = None
        for arrival, count in self.arrivals:
            if count <= 0:
                continue
            if previous is not None and count > previous[1]:
                gaps.append((previous[0], arrival, count - previous[1]))
            previous = (arrival, count)
        return gaps

    def inter_token_latencies(self, during: tuple[float, float] | None = None) -> list[float]:
        """One sample per token after the first: the gap between messages divided by the tokens it brought.

        With `during` = (start, end), only the gaps that overlap that window (a stall spanning it counts).
        """
        samples: list[float] = []
        for start, end, tokens in self.token_gaps():
            if during is None or (end > during[0] and start < during[1]):
                # A message carrying several tokens counts once per token, so percentiles are per token.
                samples.extend([(end - start) / tokens] * tokens)
        return samples

    def first_token_at(self) -> float | None:
        """Arrival time of the first message that carries a generated token."""
        return next((t for t, count in self.arrivals if count > 0), None)


def percentiles(values: list[float]) -> dict[str, float | None]:
    """p50/p90/p99 of `values` (None when there are none)."""
    if not values:
        return {f"p{p}": None for p in PERCENTILES}
    points = np.percentile(np.asarray(values, dtype=float), PERCENTILES)
    return {f"p{p}": float(v) for p, v in zip(PERCENTILES, points, strict=True)}


def summarize_level(concurrency: int, timings: list[RequestTiming], started: float, ended: float) -> dict:
    """The figures of one concurrency level, as plain JSON-ready values."""
    wall = max(ended - started, 1e-9)
    done = [t for t in timings if t.ok]
    failed = [t for t in timings if not t.ok]
    tokens = sum(t.generated_tokens for t in done)
    first_error = None
    if failed:
        first = min(failed, key=lambda t: t.finished or t.sent)
        first_error = {"code": first.error_code, "details": first.error_details}
    return {
        "concurrency": concurrency,
        "requests": len(timings),
        "completed": len(done),
        "duration_s": wall,
        "requests_per_s": len(done) / wall,
        "generated_tokens": tokens,
        "tokens_per_s": tokens / wall,
        "ttft_s": percentiles([v for t in done if (v := t.ttft()) is not None]),
        "itl_s": percentiles([v for t in done for v in t.inter_token_latencies()]),
        "errors": {"count": len(failed), "first": first_error},
    }
