"""Independent expected outputs: transformers' own generate() and tokenizer on the same model folder."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from services.gateway.pb import generation_pb2 as pb


@dataclass
class Expected:
    text: str
    generated_token_count: int
    stop_reason: int
    input_token_count: int


@lru_cache(maxsize=4)
def load(model_path: Path):
    """The tokenizer and the transformers model (a seq2seq class for an encoder-decoder) of `model_path`."""
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    seq2seq = AutoConfig.from_pretrained(model_path).is_encoder_decoder
    model = (AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM).from_pretrained(
        model_path, dtype=torch.float32).eval()
    return tokenizer, model


@contextmanager
def one_thread() -> Iterator[None]:
    """Reference forward passes on one thread: the servers under test share this machine's cores, and two OpenMP
    threads that keep being preempted by them made generate() up to ~50x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def eos_id(model) -> int:
    eos = model.config.eos_token_id
    return eos[0] if isinstance(eos, list) else eos


def greedy(model_path: Path, prompt: str, max_new_tokens: int = 20) -> Expected:
    """TGIS's answer for a greedy request, computed with transformers' generate()."""
    tokenizer, model = load(model_path)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=True).input_ids
    eos = eos_id(model)
    with one_thread(), torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=eos, num_beams=1,
                             repetition_penalty=1.0, temperature=None, top_p=None, top_k=None)
    new = out[0, ids.shape[1]:].tolist()
    if eos in new:
        new = new[: new.index(eos) + 1]
    reason = pb.EOS_TOKEN if new and new[-1] == eos else pb.MAX_TOKENS
    text = tokenizer.decode(new, skip_special_tokens=True)
    return Expected(text, len(new), reason, ids.shape[1])
