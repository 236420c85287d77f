"""Run the baselines over the scenarios' cases, then put each server's figures beside them as ratios."""

from __future__ import annotations

import argparse
import logging
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import torch
from transformers import AutoTokenizer

from bench.baseline import Baseline, token_ids
from bench.llamacpp import LlamaCppBaseline, LlamaCppUnavailable, demo_gguf
from bench.scenarios import Case
from services.common.model_path import DEMO_MODEL, ModelNotFoundError, resolve_model_path

log = logging.getLogger("bench.compare")

TRANSFORMERS = {"transformers-fp32": torch.float32, "transformers-bf16": torch.bfloat16,
                "transformers-fp16": torch.float16}
LLAMA_CPP = "llama.cpp"
BASELINES = (*TRANSFORMERS, LLAMA_CPP)


def case_key(scenario: str, case: str) -> str:
    return f"{scenario}/{case}"


def run_baselines(names: list[str], cases: list[Case], args: argparse.Namespace) -> dict[str, dict]:
    """Each named baseline's figures per case ("scenario/case" keys); `{"skipped": why}` for one that cannot run."""
    results: dict[str, dict] = {}
    for name in names:
        try:
            results[name] = _run_one(name, cases, args)
        except (LlamaCppUnavailable, ModelNotFoundError, ValueError, OSError) as exc:
            # The other figures are still worth printing.
            log.warning("baseline %s skipped: %s", name, exc)
            results[name] = {"skipped": str(exc)}
    return results


def _run_one(name: str, cases: list[Case], args: argparse.Namespace) -> dict:
    if not cases:
        return {}
    model_path = resolve_model_path(args.model)
    figures = {}
    if name == LLAMA_CPP:
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        jobs = [(case, [token_ids(tokenizer, p) for p in case.prompts]) for case in cases]
        # In a child process: a llama-cpp-python build that crashes (a segfault in a binding that does not match
        # its vendored llama.cpp was seen here) loses this baseline, not the figures measured before it.
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            try:
                return pool.submit(_llama_cpp_figures, _gguf(args), args.llama_threads, _context(cases), jobs).result()
            except BrokenProcessPool as exc:
                raise LlamaCppUnavailable(f"llama.cpp crashed: {exc}") from None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    log.info("%s: loading %s on %s", name, model_path, device)
    baseline = Baseline(model_path, TRANSFORMERS[name], device)
    baseline.warm_up(list(cases[0].prompts[:2]))
    for case in cases:
        log.info("%s: %s %s", name, case.scenario, case.name)
        prompts = list(case.prompts)
        if case.measure == "ttft":
            result = baseline.first_token_s(prompts)
        else:
            duration = args.duration if case.scenario == "short" else None
            result = baseline.run(prompts, case.batch_size, case.output_tokens, duration)
        figures[case_key(case.scenario, case.name)] = {"measure": case.measure, **result}
    return figures


def _llama_cpp_figures(gguf: Path, threads: int, context: int, jobs: list[tuple[Case, list[list[int]]]]) -> dict:
    baseline = LlamaCppBaseline(gguf, threads, context)
    figures = {}
    for case, ids in jobs:
        log.info("%s: %s %s", LLAMA_CPP, case.scenario, case.name)
        figures[case_key(case.scenario, case.name)] = {"measure": case.measure, **baseline.run(case, ids)}
    return figures


def _gguf(args: argparse.Namespace) -> Path:
    if args.gguf:
        return args.gguf
    if args.model != DEMO_MODEL:
        raise LlamaCppUnavailable(f"no GGUF file for {args.model}: pass --gguf")
    return demo_gguf()


def _context(cases: list[Case]) -> int:
    """A context long enough for the longest prompt and its output."""
    return max(len(p.tokens) + case.output_tokens for case in cases for p in case.prompts) + 16


def ratio(row: dict, base: dict | None) -> float | None:
    """Ours over the baseline as a speed-up: tokens/s over tokens/s, or the baseline's TTFT over ours."""
    if not base or not row.get("completed"):
        return None
    if base["measure"] == "ttft":
        ours = row["ttft_s"]["p50"]
        return base["ttft_s"] / ours if ours and base.get("ttft_s") else None
    return row["tokens_per_s"] / base["tokens_per_s"] if base.get("tokens_per_s") else None


def attach_ratios(servers: list[dict], baselines: dict[str, dict]) -> None:
    """Add `vs` (baseline name -> ratio) to every row of every server's scenarios."""
    for server in servers:
        for scenario in server["scenarios"]:
            for row in scenario["rows"]:
                key = case_key(scenario["scenario"], row["case"])
                row["vs"] = {name: ratio(row, figures.get(key)) for name, figures in baselines.items()
                             if "skipped" not in figures}
