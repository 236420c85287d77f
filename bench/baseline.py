"""Baseline: plain transformers generate() on the same model folder and prompts, in static batches, timed."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from bench.prompts import Prompt

log = logging.getLogger("bench.baseline")


def token_ids(tokenizer: PreTrainedTokenizerBase, prompt: Prompt) -> list[int]:
    """The ids of the tokens the server made of the prompt (so both sides see the same input)."""
    ids = tokenizer.convert_tokens_to_ids(list(prompt.tokens))
    if any(i is None or i == tokenizer.unk_token_id for i in ids):
        raise ValueError(f"the server's tokens are not in this model's vocabulary: {prompt.tokens}")
    return ids


class Baseline:
    """The model loaded once in the bench process; `run` times greedy generation in fixed-size batches."""

    def __init__(self, model_path: Path, dtype: torch.dtype = torch.float32, device: str | None = None) -> None:
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(self.device).eval()
        eos = self.model.config.eos_token_id
        eos = eos[0] if isinstance(eos, list) else eos
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos

    def token_ids(self, prompt: Prompt) -> list[int]:
        return token_ids(self.tokenizer, prompt)

    def warm_up(self, prompts: list[Prompt]) -> None:
        """A short untimed batch: the first generate() calls pay one-off allocation and initialisation costs."""
        self._generate([self.token_ids(p) for p in prompts], 2)

    def run(self, prompts: list[Prompt], batch_size: int, output_tokens: int, duration: float | None) -> dict:
        """Generate for `prompts` in batches of `batch_size`: each batch once, or in turn until `duration` passed."""
        batches = [prompts[i:i + batch_size] for i in range(0, len(prompts), batch_size)]
        tokens, elapsed, done = 0, 0.0, 0

        def more() -> bool:
            if duration is None:
                return done < len(batches)
            return done == 0 or elapsed < duration

        while batches and more():
            started = time.perf_counter()
            tokens += self._generate([self.token_ids(p) for p in batches[done % len(batches)]], output_tokens)
            elapsed += time.perf_counter() - started
            done += 1
        served = sum(len(batches[i % len(batches)]) for i in range(done))
        return {"batch_size": batch_size, "batches": done, "prompts": served, "generated_tokens": tokens,
                "duration_s": elapsed, "tokens_per_s": tokens / elapsed if elapsed else 0.0}

    def first_token_s(self, prompts: list[Prompt]) -> dict:
        """Time to the first token (a one-token generate(): the prefill) of each prompt alone; the median."""
        times = []
        for prompt in prompts:
            started = time.perf_counter()
            self._generate([self.token_ids(prompt)], 1)
            times.append(time.perf_counter() - started)
        return {"prompts": len(prompts), "ttft_s": float(np.median(times)) if times else None}

    def _generate(self, rows: list[list[int]], new_tokens: int) -> int:
        """One batched greedy generate() with left padding; returns the number of tokens generated."""
        input_ids, attention_mask = self._left_pad(rows)
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=input_ids, attention_mask=attention_mask, do_sample=False, num_beams=1,
                min_new_tokens=new_tokens, max_new_tokens=new_tokens, pad_token_id=self.pad_id,
                # The model's generation_config may carry sampling settings; greedy ignores them, say so explicitly.
                temperature=None, top_p=None, top_k=None,
            )
        generated = out.shape[1] - input_ids.shape[1]
        if generated != new_tokens:
            log.warning("baseline generated %d tokens per row instead of %d", generated, new_tokens)
        return generated * len(rows)

    def _left_pad(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row):] = 1
        return ids.to(self.device), mask.to(self.device)
