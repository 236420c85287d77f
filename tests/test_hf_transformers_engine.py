"""The hf_transformers engine: transformers models on our paged cache equal transformers; engine selection rules."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from services.common.protocol import LogitsParams
from services.worker.checkpoint import load_model
from services.worker.config import WorkerConfig
from services.worker.engine import Engine
from services.worker.frameworks import check_framework_name, choose_framework
from services.worker.models.hf_transformers import HFCausalLM
from tests.families import (
    CPU,
    HF_VARIANTS,
    build_family_model,
    expected_two_sequence_logits,
    reference,
    two_sequence_logits,
)
from tests.local_engine import LocalEngine

PROMPTS = {"a": [5, 17, 42, 99, 3, 250, 7], "b": [11, 2], "c": list(range(30, 53))}
NEW = 8


@pytest.fixture(scope="module", params=[*HF_VARIANTS, "llama"])
def model_path(request, tmp_path_factory) -> tuple[str, Path]:
    return request.param, build_family_model(request.param, tmp_path_factory.mktemp(request.param), seed=9)


def _generate(ref, ids: list[int], **kwargs) -> list[int]:
    out = ref.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                       do_sample=False, max_new_tokens=NEW, min_new_tokens=NEW, pad_token_id=0, **kwargs)
    return out[0, len(ids):].tolist()


def test_logits_match_transformers(model_path):
    variant, path = model_path
    model = load_model(path, torch.float32, CPU, framework="hf_transformers")
    assert isinstance(model, HFCausalLM)
    torch.testing.assert_close(two_sequence_logits(model), expected_two_sequence_logits(reference(path)),
                               atol=1e-4, rtol=0)


def test_greedy_and_repetition_penalty_equal_generate(model_path):
    variant, path = model_path
    ref = reference(path)
    # Unset framework: architectures without a native implementation get hf_transformers; Llama is asked for it.
    framework = "hf_accelerate" if variant == "llama" else None
    engine = Engine(WorkerConfig(model_name=str(path), device="cpu", kv_cache_memory="16MiB", kv_block_size=4,
                                 deployment_framework=framework))
    assert isinstance(engine.model, HFCausalLM)
    greedy = LocalEngine(engine, max_prefill_tokens=16).generate(PROMPTS, NEW, LogitsParams(min_new_tokens=NEW))
    assert greedy == {rid: _generate(ref, ids) for rid, ids in PROMPTS.items()}
    penalized = LocalEngine(engine).generate({"a": PROMPTS["a"]}, NEW,
                                             LogitsParams(min_new_tokens=NEW, repetition_penalty=1.5))
    assert penalized["a"] == _generate(ref, PROMPTS["a"], repetition_penalty=1.5)


def test_int8_applies_to_transformers_linear_layers(model_path):
    variant, path = model_path
    model = load_model(path, torch.float32, CPU, quantize="int8", framework="hf_transformers")
    assert not [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    expected = expected_two_sequence_logits(reference(path))
    assert (two_sequence_logits(model) - expected).abs().max() < 0.05 * expected.abs().max()


@pytest.mark.parametrize(("requested", "model_type", "safetensors", "world", "engine"), [
    (None, "llama", True, 1, "tgis_native"),
    (None, "llama", False, 1, "hf_transformers"),
    (None, "opt", True, 1, "hf_transformers"),
    ("hf_transformers", "llama", True, 1, "hf_transformers"),
    ("hf_accelerate", "opt", True, 1, "hf_transformers"),
    ("hf_transformers", "llama", True, 2, "tgis_native"),  # TGIS's forced switch with several shards
    ("hf_custom_tp", "llama", True, 2, "tgis_native"),
    ("tgis_native", "opt", True, 1, "tgis_native"),  # and then the registry refuses opt
])
def test_engine_selection(requested, model_type, safetensors, world, engine):
    chosen, why = choose_framework(requested, model_type, safetensors, world)
    assert chosen == engine and why


def test_engine_selection_refusals():
    with pytest.raises(ValueError, match="model type opt has no tgis_native implementation, and hf_transformers "
                                         "runs on one shard"):
        choose_framework(None, "opt", True, 2)
    with pytest.raises(ValueError, match="deployment framework ds_inference is not available in tgis-pipeline"):
        check_framework_name("ds_inference")
    with pytest.raises(ValueError, match="unknown deployment framework hf_magic"):
        check_framework_name("hf_magic")


def test_refusals_at_load(tmp_path):
    opt = build_family_model("opt", tmp_path / "opt")
    with pytest.raises(ValueError, match="unsupported model_type 'opt' for the tgis_native engine"):
        load_model(opt, torch.float32, CPU, framework="tgis_native")
    (tmp_path / "bart").mkdir()
    (tmp_path / "bart" / "config.json").write_text('{"model_type": "bart", "is_encoder_decoder": true}')
    with pytest.raises(ValueError, match="bart is an encoder-decoder model that tgis_native does not implement"):
        load_model(tmp_path / "bart", torch.float32, CPU, framework="tgis_native")
    from transformers import ViTConfig

    ViTConfig().save_pretrained(tmp_path / "vit")
    with pytest.raises(ValueError, match="^Unsupported model type vit$"):
        load_model(tmp_path / "vit", torch.float32, CPU)


@pytest.mark.parametrize("variant", ["mistral", "mistral-window", "qwen2", "gpt_neox", "gpt2", "gpt_bigcode", "falcon", "bloom", "mpt"])
def test_native_families_on_hf_transformers(variant, tmp_path):
    """Families with a native implementation run on hf_transformers too where transformers lets their attention
    be replaced; the others are refused at load."""
    path = build_family_model(variant, tmp_path / variant, seed=10)
    if variant in ("falcon", "bloom", "mpt"):
        with pytest.raises(ValueError, match="its attention does not go through transformers' attention interface"):
            load_model(path, torch.float32, CPU, framework="hf_transformers")
        return
    model = load_model(path, torch.float32, CPU, framework="hf_transformers")
    torch.testing.assert_close(two_sequence_logits(model), expected_two_sequence_logits(reference(path)),
                               atol=1e-4, rtol=0)
