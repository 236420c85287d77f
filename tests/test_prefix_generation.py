"""Prompt prefixes through the batcher and engine: greedy output equals transformers (and PEFT) with the prefix."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from services.common.protocol import GenerateRequest, LogitsParams, StopParams, token_ids
from services.worker.config import WorkerConfig
from services.worker.engine import Engine
from tests.families import build_family_model, reference
from tests.local_engine import LocalEngine

NEW = 6
PAD = 0
PROMPTS = {"x": [5, 17, 42, 99, 3], "y": [11, 2, 200, 31, 64, 8, 19, 77, 150]}


@pytest.fixture(scope="module", params=["llama", "gpt2", "bloom", "opt"])  # opt: on hf_transformers
def setup(request, tmp_path_factory) -> tuple[Path, Path]:
    """A tiny model of the family and a store with two random decoder.pt prefixes of its width."""
    root = tmp_path_factory.mktemp(f"prefix-{request.param}")
    model = build_family_model(request.param, root / "model", seed=5)
    hidden = reference(model).get_input_embeddings().weight.shape[1]
    gen = torch.Generator().manual_seed(7)
    for name, length in (("p1", 4), ("team/p2", 3)):
        (root / "store" / name).mkdir(parents=True)
        torch.save(torch.randn(length, hidden, generator=gen), root / "store" / name / "decoder.pt")
    return model, root / "store"


def _expected(ref, store: Path, prefix_id: str | None, ids: list[int]) -> list[int]:
    """transformers' greedy tokens from inputs_embeds = concat(prefix, embed(ids))."""
    embeds = ref.get_input_embeddings()(torch.tensor(ids))
    if prefix_id:
        embeds = torch.cat([torch.load(store / prefix_id / "decoder.pt"), embeds])
    with torch.no_grad():
        out = ref.generate(inputs_embeds=embeds[None], attention_mask=torch.ones(1, len(embeds), dtype=torch.long),
                           do_sample=False, max_new_tokens=NEW, min_new_tokens=NEW, pad_token_id=PAD)
    return out[0, -NEW:].tolist()


def _request(rid: str, ids: list[int], prefix_id: str = "", prefix_length: int = 0) -> GenerateRequest:
    return GenerateRequest(rid, token_ids([PAD] * prefix_length + ids), LogitsParams(min_new_tokens=NEW),
                           StopParams(NEW, NEW), 0.0, prefix_id, prefix_length)


def _run(local: LocalEngine, requests: list[GenerateRequest]) -> dict[str, list[int]]:
    local.batcher.submit(b"local", requests)
    return local.run({r.request_id: [] for r in requests})


def _engine(model: Path, store: Path) -> Engine:
    return Engine(WorkerConfig(model_name=str(model), device="cpu", kv_cache_memory="16MiB", kv_block_size=4,
                               prefix_store_path=str(store)))


def test_mixed_prefixes_in_one_batch_equal_transformers(setup):
    model, store = setup
    ref, engine = reference(model), _engine(model, store)
    engine.prefixes.cache_bytes = 1024  # room for one prefix: every switch evicts and reloads
    requests = [_request("x-p1", PROMPTS["x"], "p1", 4), _request("y-p2", PROMPTS["y"], "team/p2", 3),
                _request("x-none", PROMPTS["x"]), _request("y-p1", PROMPTS["y"], "p1", 4)]
    got = _run(LocalEngine(engine, max_prefill_tokens=12), requests)
    for r in requests:
        ids = list(r.input_ids)[r.prefix_length:]
        assert got[r.request_id] == _expected(ref, store, r.prefix_id or None, ids), r.request_id


def test_cached_blocks_are_shared_only_under_the_same_prefix(setup):
    model, store = setup
    ref, engine = reference(model), _engine(model, store)
    local = LocalEngine(engine)
    long_prompt = list(range(40, 60))
    assert _run(local, [_request("a", long_prompt, "p1", 4)])["a"] == _expected(ref, store, "p1", long_prompt)
    hits = local.counters["prefix_hit_tokens"]
    assert _run(local, [_request("b", long_prompt, "team/p2", 3)])["b"] == \
        _expected(ref, store, "team/p2", long_prompt)
    assert local.counters["prefix_hit_tokens"] == hits  # another prefix: nothing reused
    assert _run(local, [_request("c", long_prompt, "p1", 4)])["c"] == _expected(ref, store, "p1", long_prompt)
    assert local.counters["prefix_hit_tokens"] > hits  # the same prefix: its blocks reused


def test_a_prefix_gone_by_batching_time_fails_that_request_alone(setup):
    model, store = setup
    local = LocalEngine(_engine(model, store))
    got = _run(local, [_request("gone", PROMPTS["x"], "not-there", 2), _request("fine", PROMPTS["x"])])
    assert local.failures == {"gone": "Error retrieving prompt prefix 'not-there'"}
    assert len(got["fine"]) == NEW


def test_peft_prompt_tuning_adapter_equals_peft_generate(tmp_path_factory):
    from peft import PromptTuningConfig, TaskType, get_peft_model

    root = tmp_path_factory.mktemp("peft")
    model = build_family_model("llama", root / "model", seed=6)
    torch.manual_seed(8)
    peft_model = get_peft_model(reference(model), PromptTuningConfig(task_type=TaskType.CAUSAL_LM,
                                                                     num_virtual_tokens=5))
    peft_model.save_pretrained(root / "store" / "tuned")
    ids = PROMPTS["y"]
    # use_cache=False: PEFT 0.21's cached generation under transformers 5 was seen to leave PEFT's own forward pass
    # after the first token; without the cache it follows that forward pass (and transformers' inputs_embeds) exactly.
    with torch.no_grad():
        out = peft_model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                  do_sample=False, max_new_tokens=NEW, min_new_tokens=NEW, pad_token_id=PAD,
                                  use_cache=False)
    got = _run(LocalEngine(_engine(model, root / "store")), [_request("t", ids, "tuned", 5)])
    assert got["t"] == out[0, -NEW:].tolist()
