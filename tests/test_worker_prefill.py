"""Batched prefill: several sequences in one forward pass give what prefilling them one by one gives."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from services.common.protocol import LogitsParams, NewSequence, SequenceOutput, Step, TokenDetail, token_ids
from services.worker.checkpoint import load_model
from services.worker.config import WorkerConfig
from services.worker.engine import Engine
from services.worker.model import KVCache

CPU = torch.device("cpu")
LENGTHS = [5, 1, 17, 40, 3, 8]

# Greedy and seeded rows, every processor, input and generated details; one row per prompt of LENGTHS.
PARAMS = [
    LogitsParams(),
    LogitsParams(input_details=True, token_logprobs=True, token_ranks=True, top_n_tokens=2),
    LogitsParams(temperature=0.8, top_k=30, top_p=0.9, seed=7, repetition_penalty=1.3, min_new_tokens=4,
                 generated_details=True, token_logprobs=True, token_ranks=True, top_n_tokens=3),
    LogitsParams(repetition_penalty=0.7, min_new_tokens=2, length_penalty_start=1, length_penalty_decay=1.4,
                 input_details=True, generated_details=True, token_logprobs=True, top_n_tokens=1),
    LogitsParams(temperature=1.3, typical_p=0.7, seed=-5, length_penalty_start=2, length_penalty_decay=0.8,
                 input_details=True, token_ranks=True),
    LogitsParams(temperature=1.0, seed=123, repetition_penalty=1.1, generated_details=True, token_logprobs=True),
]


def _prompts(seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 2000, (length,), generator=gen) for length in LENGTHS]


def test_packed_prefill_matches_one_by_one_and_transformers(tiny_model_path):
    model = load_model(tiny_model_path, torch.float32, CPU)
    ref = LlamaForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32).eval()
    args, prompts = model.args, _prompts()
    caches = [KVCache(args.num_layers, 8, args.num_kv_heads, args.head_dim, 256, torch.float32, CPU, 64)
              for _ in range(2)]
    everything = [i % 2 == 1 for i in range(len(prompts))]
    packed = model.prefill(prompts, caches[0], 1, everything)  # from slot 1: slot 0 stays untouched
    for i, ids in enumerate(prompts):
        alone = model.prefill([ids], caches[1], 1 + i, [everything[i]])[0]
        torch.testing.assert_close(packed[i], alone, atol=1e-4, rtol=0)
        with torch.no_grad():
            expected = ref(ids[None]).logits[0]
        torch.testing.assert_close(packed[i], expected if everything[i] else expected[-1:], atol=1e-4, rtol=0)
    for packed_cache, alone_cache in zip(caches[0].k + caches[0].v, caches[1].k + caches[1].v, strict=True):
        for i, length in enumerate(LENGTHS):
            torch.testing.assert_close(packed_cache[1 + i, :, :length], alone_cache[1 + i, :, :length],
                                       atol=1e-5, rtol=0)
    assert not caches[0].k[0][0].any()
    # Decoding on top of the packed prefill's caches matches too.
    lengths = torch.tensor([0, *LENGTHS])
    last = torch.tensor([0] + [int(logits[-1].argmax()) for logits in packed])
    decoded = [model.decode(last, lengths, cache)[1:] for cache in caches]
    torch.testing.assert_close(decoded[0], decoded[1], atol=1e-4, rtol=0)
    for i, ids in enumerate(prompts):
        with torch.no_grad():
            expected = ref(torch.cat([ids, last[1 + i : 2 + i]])[None]).logits[0, -1]
        torch.testing.assert_close(decoded[0][i], expected, atol=1e-4, rtol=0)


def _engine(path: Path, **overrides) -> Engine:
    return Engine(WorkerConfig(model_name=str(path), device="cpu", max_batch_size=8, **overrides))


def _new(prompts: list[torch.Tensor]) -> list[NewSequence]:
    return [NewSequence(f"r{i}", token_ids(ids.tolist()), params) for i, (ids, params) in
            enumerate(zip(prompts, PARAMS, strict=True))]


def _same_detail(got: TokenDetail, want: TokenDetail) -> None:
    assert (got.token_id, got.rank, list(got.top_ids)) == (want.token_id, want.rank, list(want.top_ids))
    if math.isnan(want.logprob):
        assert math.isnan(got.logprob)
    else:
        assert got.logprob == pytest.approx(want.logprob, abs=1e-4)
    assert got.top_logprobs == pytest.approx(want.top_logprobs, abs=1e-4)


def _same_outputs(got: list[SequenceOutput], want: list[SequenceOutput]) -> None:
    assert [o.request_id for o in got] == [o.request_id for o in want]
    for g, w in zip(got, want, strict=True):
        _same_detail(g.token, w.token)
        assert (g.input_details is None) == (w.input_details is None)
        for gd, wd in zip(g.input_details or [], w.input_details or [], strict=True):
            _same_detail(gd, wd)


def _run(engine: Engine, steps: list[Step]) -> list[list[SequenceOutput]]:
    return [engine.step(step).outputs for step in steps]


def test_engine_batched_prefill_matches_one_by_one(tiny_model_path):
    """First tokens, their details, input details and the tokens after them, greedy and seeded."""
    engine = _engine(tiny_model_path)
    calls = []
    prefill = engine.model.prefill
    engine.model.prefill = lambda seqs, *rest: calls.append(len(seqs)) or prefill(seqs, *rest)
    new = _new(_prompts(1))
    running = NewSequence("running", token_ids([9, 8, 7]), LogitsParams(temperature=0.9, seed=3))
    decodes = [Step(i, [], ["r2"] if i == 4 else [], True) for i in range(2, 9)]
    batched = _run(engine, [Step(0, [running], [], False), Step(1, new, [], True), *decodes])
    assert calls == [1, len(new)]  # one forward pass for the whole burst

    engine.reset()
    calls.clear()
    # Decoding "running" first leaves it in the same state, and the slots in the same order.
    one_by_one = [Step(0, [running], [], False), Step(1, [], [], True)] + [Step(1, [seq], [], False) for seq in new]
    separate = _run(engine, [*one_by_one, *decodes])
    assert calls == [1] * (1 + len(new))
    first_tokens = [out for outputs in separate[2 : 2 + len(new)] for out in outputs]
    _same_outputs(batched[1], first_tokens + separate[1])
    for got, want in zip(batched[2:], separate[2 + len(new) :], strict=True):
        _same_outputs(got, want)


def test_prefill_token_budget_splits_bursts(tiny_model_path):
    engine = _engine(tiny_model_path)
    new = _new(_prompts(2))
    whole = _run(engine, [Step(0, new, [], False)] + [Step(i, [], [], True) for i in range(1, 4)])
    engine.reset()
    engine.max_prefill_tokens = 20
    assert [[len(seq.input_ids) for seq in chunk] for chunk in engine._prefill_chunks(new)] == [
        [5, 1], [17], [40], [3, 8],
    ]
    split = _run(engine, [Step(0, new, [], False)] + [Step(i, [], [], True) for i in range(1, 4)])
    for got, want in zip(split, whole, strict=True):
        _same_outputs(got, want)
    assert engine._prefill_chunks([]) == []
