"""Server-side figures for a benchmark run: the worker's memory (from /proc) and the step costs (from /metrics)."""

from __future__ import annotations

import urllib.request
from pathlib import Path

from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

WORKER_MODULE = "services.worker.main"
# The step's whole time (scheduler send to result) and the worker's forward pass within it.
STEP_METRIC = "tgi_batch_inference_duration"
FORWARD_METRIC = "tgi_batch_inference_forward_duration"


def _parent_pid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses; the fields after the last ')' do not.
    return int(stat[stat.rindex(")") + 2:].split()[1])


def worker_pids(launcher_pid: int) -> list[int]:
    """The worker processes the launcher started (its children running the worker module); Linux only."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or _parent_pid(int(entry.name)) != launcher_pid:
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if WORKER_MODULE.encode() in argv:
            pids.append(int(entry.name))
    return sorted(pids)


def memory_mib(pid: int) -> dict[str, float] | None:
    """Resident memory now (VmRSS) and at its peak so far (VmHWM) of one process, in MiB; None once it is gone."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return None
    fields = dict(line.split(":", 1) for line in lines if ":" in line)
    # /proc/<pid>/status gives these in kB.
    return {"rss_mib": int(fields["VmRSS"].split()[0]) / 1024, "peak_rss_mib": int(fields["VmHWM"].split()[0]) / 1024}


def workers_memory(launcher_pid: int) -> dict[str, float] | None:
    """The launcher's workers' memory added up (one rank on CPU); None when no worker is found."""
    found = [m for pid in worker_pids(launcher_pid) if (m := memory_mib(pid))]
    if not found:
        return None
    return {key: sum(m[key] for m in found) for key in found[0]}


def _prefix_counter(family: Metric) -> str | None:
    """"prefix_hit" / "prefix_queried" for the server's prefix-cache token counters, whatever their exact names."""
    # Counters are written twice (name and name_total); the parser makes the second an untyped family: skip it.
    if family.type != "counter" or "prefix" not in family.name:
        return None
    return "prefix_hit" if "hit" in family.name else "prefix_queried" if "quer" in family.name else None


def step_totals(metrics_text: str) -> dict[str, float]:
    """Steps so far, the seconds of all steps and of their forward passes, and prefix-cache tokens (every label)."""
    totals = {"steps": 0.0, "step_s": 0.0, "forward_s": 0.0, "prefix_hit": 0.0, "prefix_queried": 0.0}
    wanted = {f"{STEP_METRIC}_count": "steps", f"{STEP_METRIC}_sum": "step_s", f"{FORWARD_METRIC}_sum": "forward_s"}
    for family in text_string_to_metric_families(metrics_text):
        counter = _prefix_counter(family)
        for sample in family.samples:
            key = counter or wanted.get(sample.name)
            if key:
                totals[key] += sample.value
    return totals


def step_costs(before: dict[str, float], after: dict[str, float]) -> dict[str, float | None]:
    """Mean milliseconds per step between two `step_totals` (whole step, forward pass, the rest), and the share of
    queried prompt tokens the prefix cache held (None when the server exposes no such counters)."""
    steps = after["steps"] - before["steps"]
    queried = after["prefix_queried"] - before["prefix_queried"]
    hit_share = (after["prefix_hit"] - before["prefix_hit"]) / queried if queried > 0 else None
    if steps <= 0:
        return {"steps": 0, "step_ms": None, "forward_ms": None, "outside_forward_ms": None,
                "prefix_hit_share": hit_share}
    step = (after["step_s"] - before["step_s"]) / steps * 1000
    forward = (after["forward_s"] - before["forward_s"]) / steps * 1000
    return {"steps": int(steps), "step_ms": step, "forward_ms": forward, "outside_forward_ms": step - forward,
            "prefix_hit_share": hit_share}


def scrape(url: str, timeout: float = 10.0) -> dict[str, float] | None:
    """`step_totals` of a /metrics endpoint; None when it does not answer."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return step_totals(response.read().decode())
    except OSError:
        return None
