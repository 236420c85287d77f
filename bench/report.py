"""Render benchmark results as readable tables (figures only; nothing is judged or asserted)."""

from __future__ import annotations


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.0f}" if value >= 0.1 else f"{value * 1000:.1f}"


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _percent(share: float | None) -> str:
    return "-" if share is None else f"{share * 100:.0f}%"


def render(columns: list[str], rows: list[list[str]]) -> str:
    """Right-aligned columns under a header and a rule."""
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(lines)


def summary_table(servers: list[dict], baselines: dict[str, dict]) -> str:
    """One line per server, scenario and case: our figures and the ratio to each baseline that ran.

    Ratios are speed-ups (above 1: ours is faster): tokens/s over tokens/s, or for the prefix cases the
    baseline's time to first token over ours.
    """
    names = [name for name, figures in baselines.items() if "skipped" not in figures]
    columns = ["server", "scenario", "case", "reqs", "tok/s", "TTFT p50 ms", "ITL p50/p99 ms", "errors",
               *(f"vs {name}" for name in names)]
    rows, notes = [], []
    for server in servers:
        if server.get("error"):
            notes.append(f"server {server['server']} did not start: {server['error'].splitlines()[0]} "
                         f"(log: {server['log']})")
        for scenario in server["scenarios"]:
            for row in scenario["rows"]:
                itl = row["itl_s"]
                rows.append([server["server"], scenario["scenario"], row["case"], f"{row['completed']}/{row['requests']}",
                             _num(row["tokens_per_s"]), _ms(row["ttft_s"]["p50"]),
                             f"{_ms(itl['p50'])}/{_ms(itl['p99'])}", str(row["errors"]["count"]),
                             *(_num(row.get("vs", {}).get(name), 2) for name in names)])
                if row["errors"]["first"]:
                    first = row["errors"]["first"]
                    notes.append(f"{server['server']} {scenario['scenario']} {row['case']}: {row['errors']['count']} "
                                 f"errors, first: {first['code']}: {first['details']}")
            notes += _headline(server["server"], scenario)
    notes += [f"baseline {name} skipped: {figures['skipped']}" for name, figures in baselines.items()
              if "skipped" in figures]
    return "\n".join(filter(None, [render(columns, rows), *notes, baseline_table(baselines)]))


def _headline(server: str, scenario: dict) -> list[str]:
    figures = scenario["figures"]
    if scenario["scenario"] == "prefix":
        return [f"{server} prefix: repeat / first TTFT = {_num(figures['repeat_over_first_ttft'], 2)} "
                f"({figures['prefix_tokens']}-token shared prefix)"]
    if scenario["scenario"] == "interference":
        window = figures["window_itl_s"]
        line = (f"{server} interference: streams' ITL while the prompt is prefilled ({_ms(figures['window_s'])} ms, "
                f"{figures['window_samples']} tokens) p50/p99 = {_ms(window['p50'])}/{_ms(window['p99'])} ms, "
                f"p99/p50 = {_num(figures['window_p99_over_p50'], 2)}, "
                f"p99 / whole-run p50 = {_num(figures['window_p99_over_run_p50'], 2)}")
        if not figures["streams_outlasted_prefill"]:
            line += " (some streams ended before the prompt's first token)"
        return [line]
    return []


def baseline_table(baselines: dict[str, dict]) -> str:
    """The baselines' own figures per case."""
    rows = [[name, key, str(f.get("prompts", "-")), _num(f.get("tokens_per_s")) if f["measure"] == "throughput" else "-",
             _ms(f.get("ttft_s")), _ms(f.get("itl_s"))]
            for name, figures in baselines.items() if "skipped" not in figures for key, f in figures.items()]
    if not rows:
        return ""
    return "\nbaselines\n" + render(["baseline", "scenario/case", "prompts", "tok/s", "TTFT p50 ms", "ITL p50 ms"],
                                    rows)


def server_table(servers: list[dict]) -> str:
    """Per server and scenario: mean step time, its forward pass and the rest, the prefix-cache hit share (all from
    /metrics), and the worker's memory."""
    rows = []
    for server in servers:
        for scenario in server["scenarios"]:
            step, memory = scenario.get("step") or {}, scenario.get("worker_memory") or {}
            rows.append([server["server"], scenario["scenario"], str(step.get("steps", "-")), _num(step.get("step_ms"), 2),
                         _num(step.get("forward_ms"), 2), _num(step.get("outside_forward_ms"), 2),
                         _percent(step.get("prefix_hit_share")),
                         _num(memory.get("rss_mib"), 0), _num(memory.get("peak_rss_mib"), 0)])
    return "\nserver side\n" + render(["server", "scenario", "steps", "step ms", "forward ms", "outside fwd ms",
                                       "prefix hit", "worker RSS MiB", "peak MiB"], rows)


def quality_table(rows: list[dict]) -> str:
    """bench/quality.py's rows, whatever their keys (the first row's keys are the columns)."""
    columns = list(rows[0])
    cells = [[_num(r.get(c), 3) if isinstance(r.get(c), float) else str(r.get(c, "-")) for c in columns] for r in rows]
    return "\nquality\n" + render(columns, cells)


def header(config: dict) -> str:
    """What was measured, in one line above the tables."""
    short = (f"{config['duration']} s per level" if config["duration"] else "requests per level as listed")
    return (f"model {config['model']}; scenarios {','.join(config['scenario'])}; greedy, streamed; short: "
            f"{config['input_tokens']} in / {config['output_tokens']} out tokens, {short}")
