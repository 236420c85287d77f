"""Every `tgis_native` decoder family against transformers on the same random weights: logits, greedy, TP, int8."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from services.common.protocol import LogitsParams
from services.worker.checkpoint import NO_SAFETENSORS, load_model
from services.worker.config import WorkerConfig
from services.worker.engine import Engine
from services.worker.models import registry
from services.worker.models.hf_transformers import HFCausalLM
from tests.families import (
    COMMON,
    EOS,
    TP_VARIANTS,
    VARIANTS,
    build_family_model,
    expected_two_sequence_logits,
    reference,
    two_sequence_logits,
)
from tests.local_engine import LocalEngine
from tests.tensor_parallel import on_two_ranks

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


@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_match_transformers(variant, family_models, tmp_path_factory):
    path = _path(family_models, tmp_path_factory, variant)
    torch.testing.assert_close(two_sequence_logits(load_model(path, torch.float32, CPU)),
                               expected_two_sequence_logits(reference(path)), atol=1e-4, rtol=0)


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


def _tp_logits(rank: int, world_size: int, paths: dict[str, Path]) -> dict[str, torch.Tensor]:
    return {variant: two_sequence_logits(load_model(path, torch.float32, CPU, rank, world_size))
            for variant, path in paths.items()}


def test_tensor_parallel_matches_single_rank(family_models, tmp_path_factory, tmp_path):
    """One variant per architecture trait on two gloo ranks (one spawn for all of them)."""
    paths = {variant: _path(family_models, tmp_path_factory, variant) for variant in TP_VARIANTS}
    for result in on_two_ranks(_tp_logits, paths, folder=tmp_path):
        for variant, path in paths.items():
            expected = two_sequence_logits(load_model(path, torch.float32, CPU))
            torch.testing.assert_close(result[variant], expected, atol=1e-5, rtol=0, msg=variant)


@pytest.mark.parametrize("variant", ["gpt_neox", "gpt2", "bloom", "falcon", "mpt"])
def test_int8_quantizes_every_linear_layer_of_the_family(variant, family_models, tmp_path_factory):
    path = _path(family_models, tmp_path_factory, variant)
    model = load_model(path, torch.float32, CPU, quantize="int8")
    linears = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
    assert linears == []  # qkv, output, up and down of every layer, and the LM head
    logits, expected = two_sequence_logits(model), expected_two_sequence_logits(reference(path))
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


def test_bin_only_checkpoint_needs_hf_transformers(tmp_path):
    """tgis_native refuses a .bin-only model with TGIS's message; unset, the engine falls back to hf_transformers."""
    import transformers

    class_name, settings = VARIANTS["gpt2"]
    torch.manual_seed(4)
    ref = transformers.GPT2LMHeadModel(getattr(transformers, class_name)(**COMMON, **settings)).eval()
    ref.config.save_pretrained(tmp_path)
    torch.save(ref.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match=NO_SAFETENSORS):
        load_model(tmp_path, torch.float32, CPU, framework="tgis_native")
    model = load_model(tmp_path, torch.float32, CPU)
    assert isinstance(model, HFCausalLM)
    torch.testing.assert_close(two_sequence_logits(model), expected_two_sequence_logits(ref), atol=1e-4, rtol=0)


def test_learned_positions_bound_max_sequence_length(family_models, tmp_path_factory):
    path = _path(family_models, tmp_path_factory, "gpt_bigcode")  # n_positions 128
    with pytest.raises(ValueError, match="max_sequence_length 200 exceeds the 128 positions of gpt_bigcode's learned"):
        Engine(WorkerConfig(model_name=str(path), device="cpu", kv_cache_memory="16MiB", max_sequence_length=200))


@pytest.mark.parametrize("variant", ["bloom", "gpt_neox", "mistral-window"])
def test_compiled_forward_keeps_alibi_and_partial_rotary(variant, family_models, tmp_path_factory):
    """PT2_COMPILE traces these families too: ALiBi slopes and the sliding window reach the paged attention op,
    partial rotary fuses."""
    from services.worker.compile import compile_model

    path = _path(family_models, tmp_path_factory, variant)
    model = load_model(path, torch.float32, CPU)
    compile_model(model)
    with torch.inference_mode():
        logits = two_sequence_logits(model)
    torch.testing.assert_close(logits, expected_two_sequence_logits(reference(path)), atol=1e-4, rtol=0)


def test_sliding_window_is_applied_by_the_reference(family_models, tmp_path_factory):
    """mistral-window's tests compare with a reference that applies the window: transformers' eager and SDPA
    attention agree, and differ from the same weights attending to every key (and so do our logits)."""
    from transformers import AutoModelForCausalLM

    path = _path(family_models, tmp_path_factory, "mistral-window")
    eager = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    full = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, sliding_window=None).eval()
    expected = expected_two_sequence_logits(reference(path))
    torch.testing.assert_close(expected_two_sequence_logits(eager), expected, atol=1e-4, rtol=0)
    assert (expected_two_sequence_logits(full) - expected).abs().max() > 0.1
    ours = two_sequence_logits(load_model(path, torch.float32, CPU))
    assert (ours - expected_two_sequence_logits(full)).abs().max() > 0.1
