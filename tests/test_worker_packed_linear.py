"""Single-row bfloat16 linear layers through torch.mv (`services/worker/gemv.py`)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from services.worker.checkpoint import load_model
from services.worker.gemv import GemvLinear, use_gemv_for_single_rows

CPU = torch.device("cpu")


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [(1, 1), (1,), (3, 1), (2, 4)])
def test_gemv_linear_equals_linear(rows, bias):
    torch.manual_seed(0)
    reference = nn.Linear(64, 48, bias=bias).to(torch.bfloat16)
    gemv = nn.Linear(64, 48, bias=bias).to(torch.bfloat16)
    gemv.load_state_dict(reference.state_dict())
    assert use_gemv_for_single_rows(gemv, torch.bfloat16, CPU) == 1 and isinstance(gemv, GemvLinear)
    x = torch.randn(*rows, 64).to(torch.bfloat16)
    got, expected = gemv(x), reference(x)
    assert got.shape == expected.shape and got.dtype == expected.dtype
    torch.testing.assert_close(got.float(), expected.float(), atol=2e-2, rtol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_only_bfloat16_cpu_models_change(dtype):
    model = nn.Sequential(nn.Linear(8, 8)).to(dtype)
    assert use_gemv_for_single_rows(model, dtype, CPU) == 0 and type(model[0]) is nn.Linear


def test_bfloat16_model_loads_with_gemv_layers_and_quantized_layers_stay(tiny_model_path):
    model = load_model(tiny_model_path, torch.bfloat16, CPU)
    assert any(isinstance(m, GemvLinear) for m in model.modules())
    assert not any(type(m) is nn.Linear for m in model.modules())
    quantized = load_model(tiny_model_path, torch.bfloat16, CPU, quantize="int8")
    assert not any(isinstance(m, nn.Linear) for m in quantized.modules())
