"""Every `tgis_native` decoder family against transformers on the same random weights: logits, greedy, TP, int8."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from services.common.protocol import LogitsParams
from services.worker.checkpoint import NO_SAFETENSORS, load_model
from services.worker.config import WorkerConfig
from services.worker.engine import Engine
from services.worker.kv_cache import PagedKVCache
from services.worker.models import registry
from services.worker.paged_attention import PagedBatch, forward_context
from tests.families import EOS, TP_VARIANTS, VARIANTS, VOCAB, build_family_model, reference
from tests.local_engine import LocalEngine

CPU = torch.device("cpu")
PROMPTS = {"a": [5, 17, 42, 99, 3, 250, 7], "b": [11, 2], "c": list(range(30, 53))}


@pytest.fixture(scope="session")
def family_models(tmp_path_factory) -> dict[str, Path]:
    """Variant -> folder, each built once per session on first use."""
    return {}


def _path(family_models: dict[str, Path], tmp_path_factory, variant: str) -> Path:
    if variant not in family_models:
        family_models[variant] = build_family_model(variant, tmp_path_factory.mktemp(variant), seed=3)
    return family_models[variant]


def _logits(model, cache: PagedKVCache, runs: list[tuple[torch.Tensor, int, int]], tables) -> torch.Tensor:
    """Logits of the packed runs (tokens, start, count), decodes first, in the blocks `tables` list."""
    ids = torch.cat([tokens[start: start + count] for tokens, start, count in runs])
    positions = torch.cat([torch.arange(start, start + count) for _, start, count in runs])
    batch = PagedBatch.build(cache.block_size, tables, [r[1] for r in runs], [r[2] for r in runs], CPU)
    with forward_context(batch, cache):
        return model.logits(model(ids, positions))


def _two_sequences(model) -> torch.Tensor:
    """Logits of sequences a (12 tokens) and b (9) in scattered blocks: both prefill 5 tokens, then b decodes
    (first in each step) while a prefills a 4-token chunk and decodes; returns [a's 12 rows; b's 9 rows]."""
    cache = PagedKVCache(model.args.num_layers, 16, 4, model.kv_heads_per_rank, model.args.head_dim,
                         torch.float32, CPU)
    a, b = _sequences()
    tables = [[5, 0, 11], [9, 2, 14, 7]]  # b's, a's
    rows = _logits(model, cache, [(b, 0, 5), (a, 0, 5)], tables)
    out_b, out_a = [rows[:5]], [rows[5:]]
    for step, (a_start, a_count) in enumerate([(5, 4), (9, 1), (10, 1), (11, 1)]):
        rows = _logits(model, cache, [(b, 5 + step, 1), (a, a_start, a_count)], tables)
        out_b.append(rows[:1])
        out_a.append(rows[1:])
    return torch.cat(out_a + out_b)


def _sequences() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, VOCAB, (12,), generator=gen), torch.randint(0, VOCAB, (9,), generator=gen)


def _expected_two_sequences(ref) -> torch.Tensor:
    a, b = _sequences()
    with torch.no_grad():
        return torch.cat([ref(a[None]).logits[0], ref(b[None]).logits[0]])


@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_match_transformers(variant, family_models, tmp_path_factory):
    path = _path(family_models, tmp_path_factory, variant)
    torch.testing.assert_close(_two_sequences(load_model(path, torch.float32, CPU)),
                               _expected_two_sequences(reference(path)), atol=1e-4, rtol=0)


def _generate(ref, ids: list[int], count: int) -> list[int]:
    out = ref.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                       do_sample=False, max_new_tokens=count, min_new_tokens=count, pad_token_id=0)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("variant", VARIANTS)
def test_greedy_equals_generate_singly_and_batched(variant, family_models, tmp_path_factory):
    path = _path(family_models, tmp_path_factory, variant)
    ref = reference(path)
    expected = {rid: _generate(ref, ids, 8) for rid, ids in PROMPTS.items()}
    engine = Engine(WorkerConfig(model_name=str(path), device="cpu", kv_cache_memory="16MiB", kv_block_size=4))
    assert engine.eos_id == EOS
    params = LogitsParams(min_new_tokens=8)  # EOS suppressed, as generate(min_new_tokens=8) does
    assert LocalEngine(engine).generate({"a": PROMPTS["a"]}, 8, params) == {"a": expected["a"]}
    assert LocalEngine(engine, max_prefill_tokens=16).generate(PROMPTS, 8, params) == expected


def _tp_rank(rank: int, paths: dict[str, Path], init_file: Path, out: Path) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        logits = {variant: _two_sequences(load_model(path, torch.float32, CPU, rank, 2))
                  for variant, path in paths.items()}
        torch.save(logits, out / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_tensor_parallel_matches_single_rank(family_models, tmp_path_factory, tmp_path, monkeypatch):
    """One variant per architecture trait on two gloo ranks (one spawn for all of them)."""
    paths = {variant: _path(family_models, tmp_path_factory, variant) for variant in TP_VARIANTS}
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    mp.spawn(_tp_rank, args=(paths, tmp_path / "rendezvous", tmp_path), nprocs=2, join=True)
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        for variant, path in paths.items():
            expected = _two_sequences(load_model(path, torch.float32, CPU))
            torch.testing.assert_close(result[variant], expected, atol=1e-5, rtol=0, msg=variant)


@pytest.mark.parametrize("variant", ["gpt_neox", "gpt2", "bloom", "falcon", "mpt"])
def test_int8_quantizes_every_linear_layer_of_the_family(variant, family_models, tmp_path_factory):
    path = _path(family_models, tmp_path_factory, variant)
    model = load_model(path, torch.float32, CPU, quantize="int8")
    linears = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
    assert linears == []  # qkv, output, up and down of every layer, and the LM head
    logits, expected = _two_sequences(model), _expected_two_sequences(reference(path))
    assert (logits - expected).abs().max() < 0.05 * expected.abs().max()


def test_registry_names_every_family_and_refuses_others():
    for model_type in registry.MODEL_TYPES:
        assert model_type in registry.family(model_type).MODEL_TYPES
    with pytest.raises(ValueError, match="unsupported model_type 'opt' for the tgis_native engine"):
        registry.family("opt")
    assert not registry.supported("opt") and registry.supported("RefinedWebModel")


def test_refined_web_configs_use_their_original_names():
    old = {"model_type": "RefinedWebModel", "vocab_size": 10, "hidden_size": 64, "n_head": 4, "n_layer": 2,
           "multi_query": True, "parallel_attn": True}
    new = {**old, "model_type": "RefinedWeb", "n_head_kv": 2}
    old_args, new_args = (registry.family(c["model_type"]).decoder_args(c) for c in (old, new))
    assert (old_args.num_kv_heads, old_args.residual, old_args.qkv_layout) == (1, "parallel_shared", "contiguous")
    assert (new_args.num_kv_heads, new_args.residual, new_args.qkv_layout) == (2, "parallel", "grouped")
    assert old_args.num_layers == new_args.num_layers == 2


def test_bin_only_checkpoint_is_refused_with_tgis_message(family_models, tmp_path_factory, tmp_path):
    source = _path(family_models, tmp_path_factory, "gpt2")
    (tmp_path / "config.json").write_text((source / "config.json").read_text())
    torch.save({"wte.weight": torch.zeros(2, 2)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match=NO_SAFETENSORS):
        load_model(tmp_path, torch.float32, CPU)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "gpt2"
