"""Linear layers prepacked for oneDNN (`services/worker/packed_linear.py`): bfloat16, and float32 where it pays."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from services.worker.checkpoint import load_model
from services.worker.packed_linear import PackedLinear, pack_linear_layers, packed_linears_supported

CPU = torch.device("cpu")
pytestmark = pytest.mark.skipif(not packed_linears_supported(torch.bfloat16, CPU),
                                reason="oneDNN runs no bfloat16 on this CPU")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [(1, 1), (1,), (3, 1), (2, 4), (40,)])
def test_packed_linear_equals_linear(rows, bias, dtype):
    torch.manual_seed(0)
    reference = nn.Linear(64, 48, bias=bias).to(dtype)
    packed = nn.Sequential(nn.Linear(64, 48, bias=bias).to(dtype))
    packed[0].load_state_dict(reference.state_dict())
    assert pack_linear_layers(packed, dtype, CPU, float32="true") == 1 and isinstance(packed[0], PackedLinear)
    x = torch.randn(*rows, 64).to(dtype)
    got, expected = packed(x), reference(x)
    assert got.shape == expected.shape and got.dtype == expected.dtype
    tolerance = {"atol": 2e-2, "rtol": 1e-2} if dtype == torch.bfloat16 else {"atol": 1e-5, "rtol": 1e-5}
    torch.testing.assert_close(got.float(), expected.float(), **tolerance)


@pytest.mark.parametrize(("dtype", "mode", "faster", "packed"), [
    (torch.float16, "true", True, False),  # oneDNN's packed path takes bfloat16 and float32 only
    (torch.float32, "false", True, False),
    (torch.float32, "true", False, True),
    (torch.float32, "auto", True, True),
    (torch.float32, "auto", False, False),
])
def test_which_models_are_packed(dtype, mode, faster, packed, monkeypatch):
    monkeypatch.setattr("services.worker.packed_linear._packing_pays", lambda linear: faster)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)).to(dtype)
    assert pack_linear_layers(model, dtype, CPU, float32=mode) == (2 if packed else 0)
    assert isinstance(model[1], PackedLinear) == packed


def test_float32_auto_measures_a_layer_of_the_model(caplog):
    caplog.set_level("INFO", logger="services.worker.packed_linear")
    model = nn.Sequential(nn.Linear(256, 512))
    count = pack_linear_layers(model, torch.float32, CPU)
    assert "float32 512x256 projection, 1 + 32 rows: torch's kernel" in caplog.text
    assert count == (1 if isinstance(model[0], PackedLinear) else 0)


def test_unknown_float32_mode_is_refused():
    with pytest.raises(ValueError, match="FLOAT32_PREPACK must be one of auto, true, false, not 'yes'"):
        pack_linear_layers(nn.Sequential(nn.Linear(8, 8)), torch.float32, CPU, float32="yes")


def test_bfloat16_model_loads_packed_with_the_logits_of_unpacked(tiny_model_path, monkeypatch):
    model = load_model(tiny_model_path, torch.bfloat16, CPU)
    assert not any(type(m) is nn.Linear for m in model.modules())
    assert any(isinstance(m, PackedLinear) for m in model.modules())
    quantized = load_model(tiny_model_path, torch.bfloat16, CPU, quantize="int8")
    assert not any(isinstance(m, nn.Linear | PackedLinear) for m in quantized.modules())  # int8 layers stay int8
    monkeypatch.setattr("services.worker.checkpoint.pack_linear_layers", lambda *args, **kwargs: 0)
    unpacked = load_model(tiny_model_path, torch.bfloat16, CPU)
    hidden = torch.randn(3, model.args.hidden_size).to(torch.bfloat16)
    with torch.inference_mode():
        torch.testing.assert_close(model.logits(hidden).float(), unpacked.logits(hidden).float(), atol=2e-2, rtol=1e-2)
