"""The paged engine driven by the real batcher: paged attention, chunked prefill, prefix caching, preemption."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM

from services.common.protocol import LogitsParams, NewSequence, ScheduledChunk, Step, TokenDetail, token_ids
from services.worker import cpu_attention
from services.worker.config import WorkerConfig
from services.worker.engine import Engine
from services.worker.paged_attention import PagedBatch, paged_attention
from tests.local_engine import LocalEngine

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


@pytest.fixture(params=[False, True], ids=["torch-ops", "native"])
def native_attention(request):
    """Decode attention through torch ops, or the native CPU kernel (built here: the machine has g++)."""
    assert cpu_attention.enable(request.param) == request.param
    yield request.param
    cpu_attention.enable(False)


@pytest.mark.parametrize("positional", ["causal", "window", "alibi-window"])
@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_paged_attention_equals_dense_attention(block_size, positional, native_attention):
    """Ragged decodes and chunks (from 0 and mid-sequence) in scattered blocks match dense causal attention (and
    with a sliding window, and ALiBi biases)."""
    gen = torch.Generator().manual_seed(block_size)
    heads, kv_heads, dim, num_blocks = 4, 2, 8, 512
    k_cache = torch.zeros(num_blocks, block_size, kv_heads, dim)
    v_cache = torch.zeros_like(k_cache)
    # (total length, start of this pass's tokens): four decodes, one of them long (its own decode group), then
    # chunks from 0 and from the middle.
    layout = [(9, 8), (300, 299), (1 + block_size, block_size), (23, 22), (7, 0), (30, 12), (5, 0)]
    free = torch.randperm(num_blocks, generator=gen).tolist()
    tables = [[free.pop() for _ in range(-(-length // block_size))] for length, _ in layout]
    full_k = [torch.randn(length, kv_heads, dim, generator=gen) for length, _ in layout]
    full_v = [torch.randn(length, kv_heads, dim, generator=gen) for length, _ in layout]
    queries = [torch.randn(length - start, heads, dim, generator=gen) for length, start in layout]
    for (_, start), table, k, v in zip(layout, tables, full_k, full_v, strict=True):
        for p in range(start):  # what earlier steps wrote
            k_cache[table[p // block_size], p % block_size] = k[p]
            v_cache[table[p // block_size], p % block_size] = v[p]
    batch = PagedBatch.build(block_size, tables, [s for _, s in layout], [n - s for n, s in layout], CPU)
    assert batch.num_decode == 4 and len(batch.decode_groups) == (3 if block_size == 1 else 2)
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625]) if positional == "alibi-window" else None
    window = 6 if positional != "causal" else None
    out = paged_attention(torch.cat(queries), torch.cat([k[s:] for k, (_, s) in zip(full_k, layout, strict=True)]),
                          torch.cat([v[s:] for v, (_, s) in zip(full_v, layout, strict=True)]), k_cache, v_cache, batch,
                          alibi_slopes=slopes, sliding_window=window)
    row = 0
    for (length, start), q, k, v in zip(layout, queries, full_k, full_v, strict=True):
        keys, queried = torch.arange(length)[None], torch.arange(start, length)[:, None]
        mask = keys <= queried
        if window:
            mask = torch.zeros(mask.shape).masked_fill(~(mask & (keys > queried - window)), float("-inf"))
        if slopes is not None:
            mask = mask + slopes[:, None, None] * (keys - queried)
        want = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                              attn_mask=mask, enable_gqa=True).transpose(0, 1)
        torch.testing.assert_close(out[row: row + length - start], want, atol=1e-5, rtol=0)
        row += length - start


@pytest.mark.parametrize("window", [None, 20])
def test_native_decode_attention_in_bfloat16(window):
    """bfloat16 decodes of ragged lengths through the native kernel match float32 attention over the same
    bfloat16 K/V within bfloat16's rounding of the output."""
    assert cpu_attention.enable(True)
    try:
        gen = torch.Generator().manual_seed(7)
        heads, kv_heads, dim, block_size = 9, 3, 64, 16
        k_cache = torch.randn(64, block_size, kv_heads, dim, generator=gen).to(torch.bfloat16)
        v_cache = torch.randn(64, block_size, kv_heads, dim, generator=gen).to(torch.bfloat16)
        lengths = [1, 16, 17, 300, 45]  # keys per decode, the new one included
        tables = [torch.randperm(64, generator=gen)[: -(-n // block_size)].tolist() for n in lengths]
        q = torch.randn(len(lengths), heads, dim, generator=gen).to(torch.bfloat16)
        last = [(t[(n - 1) // block_size], (n - 1) % block_size) for t, n in zip(tables, lengths, strict=True)]
        k_new, v_new = torch.stack([k_cache[slot] for slot in last]), torch.stack([v_cache[slot] for slot in last])
        batch = PagedBatch.build(block_size, tables, [n - 1 for n in lengths], [1] * len(lengths), CPU)
        out = paged_attention(q, k_new, v_new, k_cache, v_cache, batch, sliding_window=window)
        for i, (table, n) in enumerate(zip(tables, lengths, strict=True)):
            keys = k_cache[table].flatten(0, 1)[:n].float().transpose(0, 1)
            values = v_cache[table].flatten(0, 1)[:n].float().transpose(0, 1)
            first = max(0, n - window) if window else 0
            want = F.scaled_dot_product_attention(q[i, :, None].float(), keys[:, first:], values[:, first:],
                                                  enable_gqa=True)[:, 0]
            torch.testing.assert_close(out[i].float(), want, atol=1e-2, rtol=1e-2)
    finally:
        cpu_attention.enable(False)


def _engine(path: Path, **overrides) -> Engine:
    return Engine(WorkerConfig(model_name=str(path), device="cpu", kv_cache_memory="64MiB", kv_block_size=4,
                               **overrides))


@pytest.fixture(scope="module")
def engine(tiny_model_path) -> Engine:
    return _engine(tiny_model_path)


@pytest.fixture(scope="module")
def reference(tiny_model_path) -> LlamaForCausalLM:
    return LlamaForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32).eval()


def _greedy(ref: LlamaForCausalLM, ids: list[int], count: int) -> list[int]:
    # An explicit mask: generate() would otherwise take prompt ids equal to the pad id for padding.
    out = ref.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), do_sample=False,
                       max_new_tokens=count, min_new_tokens=count, pad_token_id=0)
    return out[0, len(ids):].tolist()


def _prompts(count: int, seed: int, shared: int = 0) -> dict[str, list[int]]:
    gen = torch.Generator().manual_seed(seed)
    prefix = torch.randint(0, 2000, (shared,), generator=gen).tolist()
    lengths = torch.randint(1, 60, (count,), generator=gen).tolist()
    return {f"r{i}": prefix + torch.randint(0, 2000, (n,), generator=gen).tolist() for i, n in enumerate(lengths)}


@pytest.mark.parametrize("setting", [
    dict(),  # everything at once
    dict(max_prefill_tokens=16),  # chunked prefill beside decodes
    dict(num_blocks=24, max_prefill_tokens=16),  # a pool too small for all: preemption and recompute
    dict(prefix_caching=False, max_batch_size=3),
])
def test_greedy_matches_transformers_generate(engine, reference, setting):
    engine.reset()
    prompts = _prompts(16, seed=len(setting), shared=20)  # a shared prefix: prefix-cache hits
    local = LocalEngine(engine, **setting)
    got = local.generate(prompts, max_new_tokens=12)
    assert not local.failures
    for rid, ids in prompts.items():
        assert got[rid] == _greedy(reference, ids, 12), rid
    assert local.counters["prefix_hit_tokens"] >= (15 * 20 if setting.get("prefix_caching", True) else 0)
    assert (local.counters["preemptions"] > 0) == ("num_blocks" in setting)


def test_prefix_cache_reuses_blocks_of_an_earlier_prompt(engine, reference):
    engine.reset()
    local = LocalEngine(engine)
    prompt = list(range(100, 141))  # 41 tokens: 10 full blocks of 4
    first = local.generate({"a": prompt}, max_new_tokens=3)["a"]
    second = local.generate({"b": prompt[:-1] + [7]}, max_new_tokens=3)["b"]
    starts = [chunk.start for step in local.steps for chunk in step.run if chunk.request_id == "b"]
    assert starts[0] == 40  # 10 cached blocks, only the last token computed
    assert first == _greedy(reference, prompt, 3)
    assert second == _greedy(reference, prompt[:-1] + [7], 3)


def _same_detail(got: TokenDetail, want: TokenDetail) -> None:
    assert (got.token_id, got.rank, list(got.top_ids)) == (want.token_id, want.rank, list(want.top_ids))
    if math.isnan(want.logprob):
        assert math.isnan(got.logprob)
    else:
        assert got.logprob == pytest.approx(want.logprob, abs=1e-4)
    assert got.top_logprobs == pytest.approx(want.top_logprobs, abs=1e-4)


def test_batched_and_chunked_match_one_by_one(engine):
    """Tokens and every detail, greedy and seeded, whether sequences run together in chunks or alone."""
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 2000, (n,), generator=gen).tolist() for n in LENGTHS]

    def run(together: bool, budget: int) -> dict[str, list]:
        engine.reset()
        outputs: dict[str, list] = {}
        local = LocalEngine(engine, max_prefill_tokens=budget)
        local.batcher.submit(b"x", [])
        groups = [list(range(len(prompts)))] if together else [[i] for i in range(len(prompts))]
        for group in groups:
            from services.common.protocol import GenerateRequest, StopParams
            local.batcher.submit(b"x", [GenerateRequest(f"r{i}", token_ids(prompts[i]), PARAMS[i],
                                                        StopParams(6, 0), 0.0) for i in group])
            for step in iter(local.batcher.schedule, None):
                result = engine.step(step)
                assert not result.failed
                for out in result.outputs:
                    outputs.setdefault(out.request_id, []).append(out)
                local.batcher.complete_step(result.outputs, result.failed)
        return outputs

    alone, together = run(False, 512), run(True, 16)
    assert alone.keys() == together.keys()
    for rid in alone:
        for got, want in zip(together[rid], alone[rid], strict=True):
            _same_detail(got.token, want.token)
            assert (got.input_details is None) == (want.input_details is None)
            for g, w in zip(got.input_details or [], want.input_details or [], strict=True):
                _same_detail(g, w)


def test_a_bad_sequence_fails_alone(engine):
    """Empty prompt, out-of-vocabulary ids, bad block tables: those requests fail, the others run."""
    engine.reset()
    good = NewSequence("good", token_ids([5, 6, 7]), LogitsParams())
    bad = [NewSequence("empty", token_ids([]), LogitsParams()),
           NewSequence("oov", token_ids([5, 10**6]), LogitsParams()),
           NewSequence("table", token_ids([5, 6, 7]), LogitsParams())]
    run = [ScheduledChunk("good", 0, 3, token_ids([0])), ScheduledChunk("empty", 0, 1, token_ids([1])),
           ScheduledChunk("oov", 0, 2, token_ids([2])), ScheduledChunk("table", 0, 3, token_ids([10**7])),
           ScheduledChunk("ghost", 0, 1, token_ids([3]))]
    result = engine.step(Step(1, [good, *bad], [], run))
    assert [out.request_id for out in result.outputs] == ["good"]
    assert set(result.failed) == {"empty", "oov", "table", "ghost"}
    assert "between 1 and" in result.failed["empty"] and "vocabulary" in result.failed["oov"]
    assert "good" not in str(result.failed)  # never another request's id in a message
    assert set(engine.sequences) == {"good"}
