"""Render benchmark results as a readable table (figures only; nothing is judged or asserted)."""

from __future__ import annotations

COLUMNS = (
    ("conc", 5), ("reqs", 9), ("req/s", 7), ("tok/s", 8),
    ("TTFT p50/p90/p99 ms", 22), ("ITL p50/p90/p99 ms", 20), ("errors", 6),
    ("base tok/s", 10), ("ours/base", 9),
)


def _ms(triple: dict[str, float | None]) -> str:
    return "/".join("-" if v is None else f"{v * 1000:.0f}" if v >= 0.1 else f"{v * 1000:.1f}"
                    for v in triple.values())


def _row(level: dict) -> list[str]:
    baseline = level.get("baseline")
    return [
        str(level["concurrency"]), f"{level['completed']}/{level['requests']}", f"{level['requests_per_s']:.2f}",
        f"{level['tokens_per_s']:.1f}", _ms(level["ttft_s"]), _ms(level["itl_s"]), str(level["errors"]["count"]),
        f"{baseline['tokens_per_s']:.1f}" if baseline else "-",
        f"{baseline['ratio']:.2f}" if baseline and baseline.get("ratio") is not None else "-",
    ]


def table(levels: list[dict]) -> str:
    """One line per concurrency level, then the first error of each level that had errors."""
    widths = [max(width, len(name)) for name, width in COLUMNS]
    lines = ["  ".join(name.rjust(w) for (name, _), w in zip(COLUMNS, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    for level in levels:
        lines.append("  ".join(cell.rjust(w) for cell, w in zip(_row(level), widths, strict=True)))
    for level in levels:
        first = level["errors"]["first"]
        if first:
            lines.append(f"concurrency {level['concurrency']}: {level['errors']['count']} errors, "
                         f"first: {first['code']}: {first['details']}")
    return "\n".join(lines)


def header(config: dict) -> str:
    """What was measured, in one line above the table."""
    mode = f"{config['duration']} s per level" if config["duration"] else "requests per level as listed"
    return (f"model {config['model']} at {config['address']}: {config['input_tokens']} input tokens, "
            f"{config['output_tokens']} output tokens, greedy, streamed; {mode}")
