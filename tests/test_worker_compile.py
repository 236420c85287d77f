"""PT2_COMPILE: the compiled forward generates what transformers does, through prefill chunks, decodes and mixes."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters
from transformers import LlamaForCausalLM

from services.worker.checkpoint import load_model
from services.worker.compile import compile_model, pt2_compile_enabled
from services.worker.config import WorkerConfig
from services.worker.engine import Engine
from services.worker.packed_linear import packed_linears_supported
from tests.local_engine import LocalEngine
from tests.tensor_parallel import on_two_ranks
from tests.test_worker_model import CPU, _tp_logits

PROMPTS = {"a": [5, 17, 300, 42, 7, 99, 1000, 3, 250, 11, 64, 8, 2024, 77, 31, 4, 18, 600, 9],
           "b": [12, 13, 14], "c": [400, 401]}
NEW_TOKENS = 6


@pytest.mark.parametrize(("value", "enabled"), [(None, False), ("", False), ("false", False), ("FALSE", False),
                                                ("true", True), ("1", True), ("yes", True), ("0", True)])
def test_any_value_but_false_turns_compilation_on(value, enabled):
    assert pt2_compile_enabled(value) is enabled


def _greedy(path: Path, ids: list[int]) -> list[int]:
    ref = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    out = ref.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), do_sample=False,
                       max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, pad_token_id=0)
    return out[0, len(ids):].tolist()


def test_compiled_engine_generates_what_transformers_does(tiny_model_path, caplog):
    with caplog.at_level(logging.INFO, logger="services.worker.compile"):
        engine = Engine(WorkerConfig(model_name=str(tiny_model_path), device="cpu", kv_cache_memory="64MiB",
                                     max_batch_size=4, pt2_compile="true"))
    warm_up = [r.getMessage() for r in caplog.records]
    assert any("warm-up 1/3: 1 decode" in m for m in warm_up) and any("warm-up finished" in m for m in warm_up)
    # 8-token chunks: the long prompt is prefilled over three steps while the short ones decode beside it.
    local = LocalEngine(engine, max_batch_size=4, max_prefill_tokens=8)
    got = local.generate(PROMPTS, max_new_tokens=NEW_TOKENS)
    assert not local.failures
    assert any(len(step.run) > 1 and any(c.count > 1 for c in step.run) for step in local.steps)
    assert got == {rid: _greedy(tiny_model_path, ids) for rid, ids in PROMPTS.items()}


def _compiled_tp_logits(rank: int, world_size: int, path: Path) -> dict[str, torch.Tensor]:
    model = load_model(path, torch.float32, CPU, rank, world_size)
    compile_model(model)  # the all-reduces of the row-parallel layers are traced into the graph
    with torch.inference_mode():
        return _tp_logits(model)


def test_compiled_tensor_parallel_ranks_match_one_eager_rank(tmp_path, tiny_model_path):
    expected = _tp_logits(load_model(tiny_model_path, torch.float32, CPU))
    for result in on_two_ranks(_compiled_tp_logits, tiny_model_path, folder=tmp_path):
        for name in ("prefill", "decode"):
            torch.testing.assert_close(result[name], expected[name], atol=1e-4, rtol=0)


@pytest.mark.skipif(not packed_linears_supported(torch.bfloat16, CPU), reason="oneDNN runs no bfloat16 on this CPU")
def test_compiled_bfloat16_packs_its_weights_in_the_graph(tiny_model_path):
    expected = _tp_logits(load_model(tiny_model_path, torch.float32, CPU))
    model = load_model(tiny_model_path, torch.bfloat16, CPU, pack_linears=False)
    counters.clear()
    compile_model(model, freeze=True)
    with torch.inference_mode():
        got = _tp_logits(model)
    assert counters["inductor"]["mkldnn_linear_weight_pack_matcher_count"] > 0  # inductor packed the projections
    for name in ("prefill", "decode"):  # bfloat16's rounding, as the quantization tests bound it
        assert (got[name].float() - expected[name]).abs().max() < 0.05 * expected[name].abs().max(), name
