"""bfloat16 linear layers prepacked for oneDNN (`services/worker/packed_linear.py`)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from services.worker.checkpoint import load_model
from services.worker.packed_linear import PackedLinear, pack_linear_layers, packed_linears_supported

CPU = torch.device("cpu")
pytestmark = pytest.mark.skipif(not packed_linears_supported(torch.bfloat16, CPU),
                                reason="oneDNN runs no bfloat16 on this CPU")


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [(1, 1), (1,), (3, 1), (2, 4), (40,)])
def test_packed_linear_equals_linear(rows, bias):
    torch.manual_seed(0)
    reference = nn.Linear(64, 48, bias=bias).to(torch.bfloat16)
    packed = nn.Sequential(nn.Linear(64, 48, bias=bias).to(torch.bfloat16))
    packed[0].load_state_dict(reference.state_dict())
    assert pack_linear_layers(packed, torch.bfloat16, CPU) == 1 and isinstance(packed[0], PackedLinear)
    x = torch.randn(*rows, 64).to(torch.bfloat16)
    got, expected = packed(x), reference(x)
    assert got.shape == expected.shape and got.dtype == expected.dtype
    torch.testing.assert_close(got.float(), expected.float(), atol=2e-2, rtol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_only_bfloat16_cpu_models_change(dtype):
    model = nn.Sequential(nn.Linear(8, 8)).to(dtype)
    assert pack_linear_layers(model, dtype, CPU) == 0 and type(model[0]) is nn.Linear


def test_bfloat16_model_loads_packed_with_the_logits_of_unpacked(tiny_model_path, monkeypatch):
    model = load_model(tiny_model_path, torch.bfloat16, CPU)
    assert not any(type(m) is nn.Linear for m in model.modules())
    assert any(isinstance(m, PackedLinear) for m in model.modules())
    quantized = load_model(tiny_model_path, torch.bfloat16, CPU, quantize="int8")
    assert not any(isinstance(m, nn.Linear | PackedLinear) for m in quantized.modules())  # int8 layers stay int8
    monkeypatch.setattr("services.worker.checkpoint.pack_linear_layers", lambda *args: 0)
    unpacked = load_model(tiny_model_path, torch.bfloat16, CPU)
    hidden = torch.randn(3, model.args.hidden_size).to(torch.bfloat16)
    with torch.inference_mode():
        torch.testing.assert_close(model.logits(hidden).float(), unpacked.logits(hidden).float(), atol=2e-2, rtol=1e-2)
