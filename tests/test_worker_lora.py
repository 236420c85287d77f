"""LoRA in the engine (no sockets): PEFT adapters against PEFT's generate(), mixed batches, the LRU, the prefix cache,
tensor parallelism and the layers LoRA refuses."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from services.common.protocol import GenerateRequest, LogitsParams, NewSequence, Step, StopParams, token_ids
from services.worker.config import WorkerConfig
from services.worker.engine import Engine
from tests.conftest import build_tiny_llama
from tests.local_engine import LocalEngine
from tests.lora import make_adapter, peft_greedy
from tests.tensor_parallel import on_two_ranks

PROMPTS = {"p1": [1, 504, 2113, 9872, 34, 88], "p2": [7, 3000, 12, 45001, 9, 16, 17, 300, 2, 5, 6]}
LONG = list(range(100, 140))  # 40 tokens: two full KV blocks of 16 to share
NEW = 6


@pytest.fixture(scope="module")
def cache(tiny_model_path, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("adapters")
    make_adapter(tiny_model_path, root / "a", seed=1)
    make_adapter(tiny_model_path, root / "a-bin", seed=1, safetensors=False)  # the same adapter as a .bin
    make_adapter(tiny_model_path, root / "team" / "b", seed=2, targets=("q_proj", "v_proj", "down_proj"), r=4,
                 alpha_pattern={"v_proj": 4})
    return root


@pytest.fixture(scope="module")
def expected(tiny_model_path, cache) -> dict[tuple[str, str], list[int]]:
    """PEFT's greedy tokens per (adapter id or "", prompt name)."""
    return {(a, p): peft_greedy(tiny_model_path, cache / a if a else None, ids, NEW)
            for a in ("a", "team/b", "") for p, ids in {**PROMPTS, "long": LONG}.items()}


def _engine(path: Path, cache: Path, **overrides) -> Engine:
    return Engine(WorkerConfig(model_name=str(path), device="cpu", kv_cache_memory="128MiB",
                               adapter_cache=str(cache), **overrides))


def _generate(local: LocalEngine, requests: list[tuple[str, str, list[int]]]) -> dict[str, list[int]]:
    """Greedy NEW tokens per request id of (request id, adapter id, prompt), all queued at once."""
    local.batcher.submit(b"t", [GenerateRequest(rid, token_ids(ids), LogitsParams(), StopParams(NEW, NEW), 0.0,
                                                adapter_id=adapter) for rid, adapter, ids in requests])
    return local.run({rid: [] for rid, _, _ in requests})


@pytest.fixture(scope="module")
def local(tiny_model_path, cache) -> LocalEngine:
    return LocalEngine(_engine(tiny_model_path, cache, max_loras=2))


def test_adapters_and_no_adapter_in_one_batch_each_equal_peft(local, expected):
    requests = [(f"{a or 'none'}-{p}", a, ids) for a in ("a", "team/b", "") for p, ids in PROMPTS.items()]
    got = _generate(local, requests)
    assert not local.failures
    # All six decoded together: one step carried both adapters and plain rows.
    assert any(len(step.run) == 6 for step in local.steps)
    for a in ("a", "team/b", ""):
        for p in PROMPTS:
            assert got[f"{a or 'none'}-{p}"] == expected[(a, p)], (a, p)


def test_a_bin_adapter_loads_as_its_safetensors_twin(local, cache, expected):
    assert (cache / "a-bin" / "adapter_model.bin").exists()
    assert _generate(local, [("bin", "a-bin", PROMPTS["p2"])])["bin"] == expected[("a", "p2")]


def test_kv_blocks_are_never_shared_across_adapters(local, expected):
    for rid, adapter in (("x1", "a"), ("x2", ""), ("x3", "team/b"), ("x4", "a")):
        hits = local.counters["prefix_hit_tokens"]
        got = _generate(local, [(rid, adapter, LONG)])
        assert got[rid] == expected[(adapter, "long")], rid
        # Only the second request with adapter a finds the first one's blocks.
        assert (local.counters["prefix_hit_tokens"] > hits) == (rid == "x4")


def test_one_adapter_loaded_at_a_time_evicts_and_reloads(tiny_model_path, cache, expected):
    local = LocalEngine(_engine(tiny_model_path, cache, max_loras=1))
    loras = local.engine.loras
    for i, adapter in enumerate(("a", "team/b", "a", "team/b")):
        assert _generate(local, [(f"r{i}", adapter, PROMPTS["p1"])])[f"r{i}"] == expected[(adapter, "p1")]
        assert loras.loaded == [adapter]
    assert (loras.loads, loras.evictions) == (4, 3)
    # Queued together, the scheduler runs them one adapter at a time (MAX_LORAS 1), each still right.
    got = _generate(local, [("s1", "a", PROMPTS["p1"]), ("s2", "team/b", PROMPTS["p2"]), ("s3", "", PROMPTS["p2"])])
    assert [got["s1"], got["s2"], got["s3"]] == [expected[("a", "p1")], expected[("team/b", "p2")],
                                                  expected[("", "p2")]]
    for step in local.steps:
        running = {new.adapter_id for new in step.add} - {""}
        assert len(running) <= 1


def test_a_misfit_or_missing_adapter_fails_its_sequence_alone(local, tmp_path, demo_model_path):
    other = build_tiny_llama(tmp_path / "wide", demo_model_path, hidden_size=96, num_attention_heads=4)
    make_adapter(other, Path(local.engine.loras.root) / "wide", seed=5, targets=("q_proj",))
    deeper = build_tiny_llama(tmp_path / "deep", demo_model_path, num_hidden_layers=3)
    make_adapter(deeper, Path(local.engine.loras.root) / "deep", seed=6, targets=("q_proj",))
    step = Step(1, [NewSequence("w", token_ids([1, 2, 3]), LogitsParams(), adapter_id="wide"),
                    NewSequence("d", token_ids([1, 2, 3]), LogitsParams(), adapter_id="deep"),
                    NewSequence("m", token_ids([1, 2, 3]), LogitsParams(), adapter_id="missing")], [], [])
    result = local.engine.step(step)
    assert result.failed["d"] == ("can't load adapter with id 'deep': model.layers.2.self_attn.q_proj is not a layer "
                                  "of this model")
    assert "q_proj: lora_A [8, 96] and lora_B [96, 8] do not fit the model's layer (64 in, 64 out)" in result.failed["w"]
    assert result.failed["m"] == "can't retrieve adapter with id 'missing': directory does not exist"


def test_models_without_lora_say_so(tiny_model_path, cache):
    engine = _engine(tiny_model_path, cache, deployment_framework="hf_transformers")
    assert engine.loras is None and engine.model_info().lora_modules == {}
    result = engine.step(Step(1, [NewSequence("s", token_ids([1, 2]), LogitsParams(), adapter_id="a")], [], []))
    assert result.failed["s"] == "can't load adapter with id 'a': LoRA adapters are off on this worker"


def _rank_generate(rank: int, world_size: int, path: Path, cache: Path) -> dict[str, list[int]]:
    local = LocalEngine(_engine(path, cache, rank=rank, world_size=world_size, max_loras=2))
    return _generate(local, [(f"{a or 'none'}-p1", a, PROMPTS["p1"]) for a in ("a", "team/b", "")])


def test_tensor_parallel_lora_equals_peft(tiny_model_path, cache, expected, tmp_path):
    """Two gloo ranks: A/B split as the base layers are (QKV by heads, gate/up by rows, o/down by columns)."""
    for got in on_two_ranks(_rank_generate, tiny_model_path, cache, folder=tmp_path):
        for a in ("a", "team/b", ""):
            assert got[f"{a or 'none'}-p1"] == expected[(a, "p1")], a


def test_compiled_engine_runs_lora_steps_eagerly_and_plain_steps_compiled(tiny_model_path, cache, expected):
    """PT2_COMPILE: the graph is traced without LoRA (wrapped layers see no LoRA batch); steps with LoRA rows take
    the eager forward, the others the compiled one."""
    engine = _engine(tiny_model_path, cache, max_batch_size=4, pt2_compile="true")
    assert engine.eager_forward is not engine.model.forward  # compiled
    got = _generate(LocalEngine(engine, max_batch_size=4), [("a", "a", PROMPTS["p1"]), ("n", "", PROMPTS["p2"])])
    assert got == {"a": expected[("a", "p1")], "n": expected[("", "p2")]}
    got = _generate(LocalEngine(engine, max_batch_size=4), [("n2", "", PROMPTS["p1"])])  # plain: compiled
    assert got["n2"] == expected[("", "p1")]


def test_lora_with_a_prompt_prefix_equals_peft_on_the_prefixed_embeddings(tiny_model_path, cache, tmp_path):
    """prefix_id and adapter_id together: the prefix rows replace the placeholders' embeddings, then every layer
    runs with the adapter (PEFT's generate() from inputs_embeds)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    prefix = torch.randn(3, 64, generator=torch.Generator().manual_seed(4))
    (tmp_path / "soft").mkdir()
    torch.save(prefix, tmp_path / "soft" / "decoder.pt")
    ids = PROMPTS["p1"]
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_path), cache / "a").eval()
    with torch.no_grad():
        embeds = torch.cat([prefix, reference.get_input_embeddings()(torch.tensor(ids))])[None]
        want = reference.generate(inputs_embeds=embeds, attention_mask=torch.ones(1, embeds.shape[1], dtype=torch.long),
                                  do_sample=False, max_new_tokens=NEW, min_new_tokens=NEW, pad_token_id=0)[0].tolist()
    local = LocalEngine(_engine(tiny_model_path, cache, prefix_store_path=str(tmp_path)))
    placeholders = [local.engine.pad_id] * 3
    local.batcher.submit(b"t", [GenerateRequest("pa", token_ids(placeholders + ids), LogitsParams(), StopParams(NEW, NEW),
                                                0.0, prefix_id="soft", prefix_length=3, adapter_id="a")])
    assert local.run({"pa": []})["pa"] == want
