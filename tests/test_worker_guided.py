"""Guided decoding in the worker engine (tiny random Llama, demo tokenizer): constrained rows beside free ones."""

from __future__ import annotations

import math

import pytest
from transformers import AutoTokenizer

from bench import guided_cost
from services.common.protocol import GenerateRequest, GuideKind, LogitsParams, StopParams, token_ids
from services.gateway.guided import guide_of
from services.worker.config import WorkerConfig
from services.worker.engine import Engine
from services.worker.guided import Guides
from tests.guided_checks import CHOICES, DECODING, check
from tests.local_engine import LocalEngine


@pytest.fixture(scope="module")
def engine(tiny_model_path) -> Engine:
    return Engine(WorkerConfig(model_name=str(tiny_model_path), device="cpu", kv_cache_memory="64MiB",
                               kv_block_size=4))


@pytest.fixture(scope="module")
def tokenizer(tiny_model_path):
    return AutoTokenizer.from_pretrained(tiny_model_path)


def guided(kind: str, **fields) -> LogitsParams:
    guide_kind, guide = guide_of(DECODING[kind])
    return LogitsParams(guide_kind=guide_kind, guide=guide, **fields)


def run(engine: Engine, requests: dict[str, tuple[list[int], LogitsParams, int]], **setting) -> LocalEngine:
    """Queue every (prompt, params, min_new_tokens) at once with 16 max new tokens; tokens in `.got`."""
    local = LocalEngine(engine, **setting)
    local.batcher.submit(b"t", [GenerateRequest(rid, token_ids(ids), params, StopParams(16, min_new), 0.0)
                                for rid, (ids, params, min_new) in requests.items()])
    local.got = local.run({rid: [] for rid in requests})
    return local


def text_of(tokenizer, ids: list[int], eos: int) -> tuple[str, bool]:
    finished = bool(ids) and ids[-1] == eos
    return tokenizer.decode(ids[:-1] if finished else ids), finished


@pytest.mark.parametrize("setting", [dict(), dict(num_blocks=12, max_prefill_tokens=8)])  # 2nd: preemptions
def test_five_kinds_beside_free_rows_which_are_unchanged(engine, tokenizer, setting):
    engine.reset()
    prompts = [tokenizer.encode(t) for t in ("Answer:", "A JSON object:", "Code", "Pick one", "Sum")]
    free = {f"free{i}": (prompt, LogitsParams(), 16) for i, prompt in enumerate(prompts[:3])}
    alone = run(engine, free).got
    requests = {kind: (prompt, guided(kind), 0) for kind, prompt in zip(DECODING, prompts, strict=True)}
    local = run(engine, {**requests, **free}, **setting)
    assert not local.failures
    assert (local.counters["preemptions"] > 0) == ("num_blocks" in setting)
    for rid in free:
        assert local.got[rid] == alone[rid], rid
    for kind in DECODING:
        text, finished = text_of(tokenizer, local.got[kind], engine.eos_id)
        check(kind, text, finished)
    # The finite languages end within 16 tokens even on a random model: EOS is allowed once they may end.
    for kind in ("choice", "grammar"):
        assert local.got[kind][-1] == engine.eos_id, kind


def test_min_new_tokens_holds_and_the_text_stays_a_choice(engine, tokenizer):
    engine.reset()
    local = run(engine, {"c": (tokenizer.encode("Pick"), guided("choice"), 12)})
    ids = local.got["c"]
    assert len(ids) == 12 and ids[-1] == engine.eos_id
    assert tokenizer.decode(ids, skip_special_tokens=True) in CHOICES


def test_a_seeded_sample_is_the_same_alone_and_in_a_batch(engine, tokenizer):
    engine.reset()
    params = guided("json_schema", temperature=1.5, seed=1234, top_k=50)
    prompt = tokenizer.encode("Person:")
    alone = run(engine, {"s": (prompt, params, 0)}).got["s"]
    others = {f"o{i}": (tokenizer.encode(f"other {i}"), guided("regex") if i % 2 else LogitsParams(), 0)
              for i in range(4)}
    assert run(engine, {"s": (prompt, params, 0), **others}).got["s"] == alone
    check("json_schema", *text_of(tokenizer, alone, engine.eos_id))


def test_logprobs_are_of_the_constrained_distribution(engine, tokenizer):
    engine.reset()
    params = guided("choice", token_logprobs=True, top_n_tokens=32, generated_details=True)
    local = LocalEngine(engine)
    local.batcher.submit(b"t", [GenerateRequest("d", token_ids(tokenizer.encode("Pick")), params, StopParams(4), 0.0)])
    detail = engine.step(local.batcher.schedule()).outputs[0].token
    # Top tokens are only those the constraint allows (prefixes of a choice), and they carry all the mass.
    assert all(any(c.startswith(tokenizer.decode([t])) for c in CHOICES) for t in detail.top_ids)
    assert math.isclose(sum(math.exp(lp) for lp in detail.top_logprobs), 1.0, rel_tol=1e-4)
    assert detail.logprob <= 0.0 and detail.token_id in detail.top_ids


def test_a_constraint_the_worker_cannot_compile_fails_that_request_alone(engine, tokenizer):
    engine.reset()
    bad = LogitsParams(guide_kind=GuideKind.REGEX, guide="(ab")
    local = run(engine, {"bad": (tokenizer.encode("x"), bad, 0), "ok": (tokenizer.encode("y"), LogitsParams(), 4)})
    assert "failed to compile" in local.failures["bad"] and "parenthesis" in local.failures["bad"]
    assert len(local.got["ok"]) == 16


def test_the_cost_benchmark_runs(tiny_model_path, capsys):
    assert guided_cost.main(["--batch", "2", "--steps", "2", "--kinds", "json,grammar", "--model",
                             str(tiny_model_path)]) == 0
    out = capsys.readouterr().out
    assert "json " in out and "grammar " in out and "per token" in out


def test_compiled_constraints_are_cached_by_text_up_to_the_knob(engine):
    guides = Guides(engine.model_path, engine.vocab_size, engine.eos_id, cache_size=2)
    first = guides.start(LogitsParams(guide_kind=GuideKind.REGEX, guide="a+"))
    first.matcher()
    again = guides.start(LogitsParams(guide_kind=GuideKind.REGEX, guide="a+"))
    assert again._compiled is first._compiled  # the same compiled grammar, not compiled twice
    for text in ("b+", "c+"):
        guides.start(LogitsParams(guide_kind=GuideKind.REGEX, guide=text)).matcher()
    assert list(guides._compiled) == [(GuideKind.REGEX, "b+"), (GuideKind.REGEX, "c+")]
    assert guides.start(LogitsParams(guide_kind=GuideKind.REGEX, guide="a+"))._compiled is not first._compiled
    assert guides.start(LogitsParams()) is None


def test_a_length_penalty_never_lets_eos_past_the_constraint(engine, tokenizer):
    engine.reset()
    # The boost grows EOS's score; where the constraint forbids EOS (-inf) it must stay forbidden.
    params = guided("json_schema", length_penalty_start=0, length_penalty_decay=10.0)
    local = run(engine, {"j": (tokenizer.encode("Person:"), params, 0)})
    check("json_schema", *text_of(tokenizer, local.got["j"], engine.eos_id))
