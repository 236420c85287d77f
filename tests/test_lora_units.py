"""LoRA's plain parts, without sockets or a model: row grouping and deltas, the adapter store's checks and messages,
the gateway lookup, the scheduler's adapter rules, and LoRA over float, bfloat16, int8 and int4 layers."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from services.common.lora_adapters import AdapterError, check_fit, find_adapter, safetensors_shapes
from services.common.protocol import GenerateRequest, LogitsParams, ModelInfo, StopParams, token_ids
from services.gateway.adapters import AdapterLookup
from services.gateway.validation import ValidationError
from services.scheduler.batcher import Batcher
from services.scheduler.blocks import BlockManager
from services.worker.lora import lora_dtype
from services.worker.lora_layers import LoraBatch, LoraLinear, LoraWeights, lora_context
from services.worker.quant import Int4Linear, Int8Linear

MODULES = {"q_proj": [8, 8], "v_proj": [8, 4]}
KEY = "base_model.model.model.layers.0.self_attn.{}.lora_{}.weight"


def _weights(name: str, gen: torch.Generator, fan_in: int = 8, fan_out: int = 6, r: int = 2) -> LoraWeights:
    return LoraWeights(name, {"layer": (torch.randn(fan_in, r, generator=gen), torch.randn(r, fan_out, generator=gen))})


def test_rows_are_grouped_per_adapter_and_plain_steps_have_no_batch():
    gen = torch.Generator().manual_seed(0)
    a, b = _weights("a", gen), _weights("b", gen)
    batch = LoraBatch.build([(a, 1), (None, 1), (b, 3), (a, 2)], torch.device("cpu"))
    assert [(w.adapter_id, rows.tolist()) for w, rows in batch.groups] == [("a", [0, 5, 6]), ("b", [2, 3, 4])]
    assert LoraBatch.build([(None, 4), (None, 1)], torch.device("cpu")) is None
    assert LoraBatch.build([(a, 4), (a, 1)], torch.device("cpu")).groups[0][1] is None  # one adapter: no gather


def test_each_row_gets_its_own_adapters_delta():
    gen = torch.Generator().manual_seed(1)
    a, b = _weights("a", gen), _weights("b", gen)
    base = nn.Linear(8, 6)
    layer = LoraLinear(base, "layer")
    x = torch.randn(5, 8, generator=gen)
    runs = [a, None, b, b, a]
    with torch.no_grad(), lora_context(LoraBatch.build([(w, 1) for w in runs], torch.device("cpu"))):
        y = layer(x)
    with torch.no_grad():
        for i, w in enumerate(runs):
            delta = 0 if w is None else x[i] @ w.layers["layer"][0] @ w.layers["layer"][1]
            torch.testing.assert_close(y[i], base(x[i]) + delta)
        assert torch.equal(layer(x), base(x))  # outside a LoRA step: the base layer alone


@pytest.mark.parametrize("kind", ["bfloat16", "int8", "int4"])
def test_lora_composes_with_quantized_and_bfloat16_layers(kind):
    """LoRA reads and adds in the activation dtype whatever the weights format; its matmuls run in float32 on CPU."""
    gen = torch.Generator().manual_seed(2)
    linear = nn.Linear(64, 32, bias=False)
    base = {"bfloat16": linear.to(torch.bfloat16), "int8": Int8Linear(linear.weight, None),
            "int4": Int4Linear(linear.weight, None, 32)}[kind]
    w = _weights("a", gen, 64, 32, 4)  # float32: lora_dtype on CPU
    assert lora_dtype(torch.bfloat16, torch.device("cpu")) == torch.float32
    assert lora_dtype(torch.bfloat16, torch.device("cuda")) == torch.bfloat16
    x = torch.randn(3, 64, generator=gen).to(torch.bfloat16)
    with torch.no_grad(), lora_context(LoraBatch.build([(w, 2), (None, 1)], torch.device("cpu"))):
        y = LoraLinear(base, "layer")(x)
    with torch.no_grad():
        delta = ((x.float() @ w.layers["layer"][0]) @ w.layers["layer"][1]).to(torch.bfloat16)
        expected = base(x) + torch.cat([delta[:2], torch.zeros(1, 32, dtype=torch.bfloat16)])
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, expected)


def _adapter(root: Path, name: str, config: dict | None = None, tensors: dict | None = None) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4,
                                                            **(config or {})}))
    tensors = tensors if tensors is not None else {KEY.format("q_proj", "A"): torch.zeros(2, 8),
                                                   KEY.format("q_proj", "B"): torch.zeros(8, 2)}
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return folder


@pytest.mark.parametrize(("name", "message"), [
    ("bad id!", "Invalid adapter id 'bad id!', must contain only alphanumeric, _ and - and /"),
    ("a/../b", "Invalid adapter id 'a/../b', must contain only alphanumeric, _ and - and /"),
    ("/tmp", "Invalid adapter id '/tmp', must contain only alphanumeric, _ and - and /"),
    ("gone", "can't retrieve adapter with id 'gone': directory does not exist"),
    ("empty", "can't retrieve adapter with id 'empty': invalid adapter: no adapter_config.json found"),
    ("prompt", "adapter type PROMPT_TUNING is not currently supported"),
    ("dora", "can't load adapter with id 'dora': LoRA with DoRA is not supported"),
    ("biased", "can't load adapter with id 'biased': LoRA with bias='all' is not supported"),
    ("weightless", "can't retrieve adapter with id 'weightless': invalid adapter: no adapter_model.safetensors or "
                   "adapter_model.bin found"),
])
def test_store_refusals_in_the_vllm_tgis_adapters_words(tmp_path, name, message):
    (tmp_path / "empty").mkdir()
    _adapter(tmp_path, "prompt", {"peft_type": "PROMPT_TUNING"})
    _adapter(tmp_path, "dora", {"use_dora": True})
    _adapter(tmp_path, "biased", {"bias": "all"})
    (_adapter(tmp_path, "weightless") / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterError) as error:
        find_adapter(tmp_path, name)
    assert str(error.value) == message


def test_fit_checks_targets_shapes_and_stray_tensors(tmp_path):
    files = find_adapter(tmp_path, _adapter(tmp_path, "team/ok").relative_to(tmp_path).as_posix())
    shapes = safetensors_shapes(files.weights)
    assert shapes == {KEY.format("q_proj", "A"): [2, 8], KEY.format("q_proj", "B"): [8, 2]}
    check_fit("ok", shapes, MODULES)
    cases = {
        "target module model.layers.0.self_attn.k_proj is not one LoRA is served on for this model (supported: "
        "q_proj, v_proj)": {KEY.format("k_proj", "A"): [2, 8], KEY.format("k_proj", "B"): [8, 2]},
        "model.layers.0.self_attn.v_proj: lora_A [2, 8] and lora_B [8, 2] do not fit the model's layer (8 in, 4 out)":
            {KEY.format("v_proj", "A"): [2, 8], KEY.format("v_proj", "B"): [8, 2]},
        "model.layers.0.self_attn.q_proj has lora_A or lora_B but not both": {KEY.format("q_proj", "A"): [2, 8]},
        "tensor base_model.model.lm_head.weight is not a LoRA A/B weight (adapters saving base layers are not "
        "served)": {**shapes, "base_model.model.lm_head.weight": [10, 8]},
        "this model does not serve LoRA adapters (tgis_native Llama-family models do)": None,
    }
    for message, bad in cases.items():
        with pytest.raises(AdapterError) as error:
            check_fit("x", bad or shapes, MODULES if bad else {})
        assert str(error.value).startswith(f"can't load adapter with id 'x': {message}")


def test_gateway_lookup_checks_once_and_refuses_with_the_message(tmp_path):
    _adapter(tmp_path, "ok")
    model = ModelInfo("m", "/m", False, 10, 0, 0, 64, 16, 1, 1, "cpu", "float32", max_loras=2, lora_modules=MODULES)
    lookup = AdapterLookup(str(tmp_path))
    asyncio.run(lookup.check("ok", model))
    (tmp_path / "ok" / "adapter_config.json").unlink()  # remembered: not read again
    asyncio.run(lookup.check("ok", model))
    with pytest.raises(ValidationError, match="^can't retrieve adapter with id 'nope': directory does not exist$"):
        asyncio.run(lookup.check("nope", model))
    off = ModelInfo("m", "/m", False, 10, 0, 0, 64, 16, 1, 1, "cpu", "float32")  # workers without ADAPTER_CACHE
    with pytest.raises(ValidationError, match="no adapter store was configured"):
        asyncio.run(lookup.check("ok", off))
    # Workers with ADAPTER_CACHE on a model that takes no adapters: refused whatever the weights file.
    (_adapter(tmp_path, "bin") / "adapter_model.safetensors").rename(tmp_path / "bin" / "adapter_model.bin")
    unsupported = ModelInfo("m", "/m", False, 10, 0, 0, 64, 16, 1, 1, "cpu", "float32", max_loras=2)
    with pytest.raises(ValidationError, match="^can't load adapter with id 'bin': this model does not serve LoRA"):
        asyncio.run(lookup.check("bin", unsupported))


def _request(rid: str, adapter: str, ids: list[int]) -> GenerateRequest:
    return GenerateRequest(rid, token_ids(ids), LogitsParams(), StopParams(4), 0.0, adapter_id=adapter)


def test_batcher_admits_at_most_max_loras_adapters_and_roots_hashes_at_the_adapter():
    batcher = Batcher(8, 24, 2, BlockManager(64, 4), max_loras=2)
    prompt = list(range(10, 22))
    batcher.submit(b"g", [_request(r, a, prompt) for r, a in
                          (("1", "a"), ("2", "b"), ("3", "c"), ("4", "a"), ("5", ""))])
    step = batcher.schedule(now=0.0)
    assert [(n.request_id, n.adapter_id) for n in step.add] == [("1", "a"), ("2", "b"), ("4", "a"), ("5", "")]
    assert [s.request_id for s in batcher.waiting] == ["3"]  # a third adapter waits for a or b to finish
    roots = {s.request_id: s.cache_root for s in batcher.running.values()}
    assert roots["1"] == roots["4"] and len({roots["1"], roots["2"], roots["5"]}) == 3 and roots["5"] == b""
    # Same tokens, different adapters: no block is shared.
    assert not set(batcher.running["1"].table.blocks) & set(batcher.running["2"].table.blocks)
