"""Weight-only int8 / int4 linear layers against float linear layers, tensor-parallel shards, and model rewriting."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from services.worker.config import quantize_method
from services.worker.quant import Int4Linear, Int8Linear, int4_group_size, pack_int4_cuda, quantize_model

# Relative error (Frobenius) of the layer output on N(0, 0.05) weights, measured on this CPU: int8 0.008,
# int4 0.078 (group 32) / 0.090 (64) / 0.101 (128). The bounds leave ~50% margin.
INT8_BOUND = 0.013
INT4_BOUND = {32: 0.12, 64: 0.135, 128: 0.15}


def _linear(k: int, n: int, bias: bool = True, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    layer = nn.Linear(k, n, bias=bias)
    nn.init.normal_(layer.weight, std=0.05)
    return layer.requires_grad_(False)


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


@pytest.mark.parametrize(("k", "n"), [(576, 1536), (1536, 576), (576, 192), (128, 48)])
@pytest.mark.parametrize("bias", [True, False])
def test_int8_linear_matches_float(k: int, n: int, bias: bool) -> None:
    layer = _linear(k, n, bias)
    x = torch.randn(2, 3, k)
    out = Int8Linear(layer.weight, layer.bias)(x)
    assert out.shape == (2, 3, n) and out.dtype == torch.float32
    assert _rel(out, layer(x)) < INT8_BOUND


@pytest.mark.parametrize(("k", "n"), [(576, 1536), (1536, 576), (256, 48)])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_linear_matches_float(k: int, n: int, group: int) -> None:
    if k % group:
        pytest.skip("group does not divide K")
    layer = _linear(k, n)
    x = torch.randn(5, k)
    error = _rel(Int4Linear(layer.weight, layer.bias, group)(x), layer(x))
    assert 0.02 < error < INT4_BOUND[group]  # 4 bits do lose something: a no-op would pass the upper bound alone


def test_exactly_representable_weights_come_back_to_bf16_precision() -> None:
    """Weights on each format's grid survive quantization: only bfloat16 rounding remains (also checks packing order)."""
    torch.manual_seed(1)
    n, k, group = 32, 128, 32
    scale = torch.rand(n, 1) * 0.01 + 0.001
    int8_weight = torch.randint(-127, 128, (n, k)).float() * scale
    int8_weight[:, 0] = 127 * scale[:, 0]  # the row maximum defines the scale
    levels = torch.randint(0, 16, (n, k // group, group)).float()
    levels[..., 0], levels[..., 1] = 0, 15  # every group spans the whole range
    low = torch.randn(n, k // group, 1) * 0.01
    int4_weight = (low + levels * scale[..., None]).reshape(n, k)
    x = torch.randn(4, k)
    for layer, weight in ((Int8Linear(int8_weight, None), int8_weight),
                          (Int4Linear(int4_weight, None, group), int4_weight)):
        bf16_error = _rel(x.bfloat16() @ weight.bfloat16().T, x @ weight.T)
        assert _rel(layer(x), x @ weight.T) < 2 * bf16_error + 1e-3


def test_output_keeps_the_activation_dtype() -> None:
    layer = _linear(256, 64)
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    for quantized in (Int8Linear(layer.weight, layer.bias), Int4Linear(layer.weight, layer.bias, 64)):
        assert quantized(x).dtype == torch.bfloat16
        assert _rel(quantized(x), layer(x.float())) < 0.15


def test_column_parallel_shards_equal_the_whole_layer() -> None:
    """Split by output rows (q/k/v, gate/up under TP): each shard quantized alone gives the same outputs."""
    layer = _linear(256, 128)
    x = torch.randn(3, 256)
    for make in (lambda w, b: Int8Linear(w, b), lambda w, b: Int4Linear(w, b, 64)):
        whole = make(layer.weight, layer.bias)(x)
        shards = [make(w, b)(x) for w, b in zip(layer.weight.chunk(2), layer.bias.chunk(2), strict=True)]
        torch.testing.assert_close(torch.cat(shards, dim=-1), whole, rtol=0, atol=0)


def test_row_parallel_shards_sum_to_the_whole_layer() -> None:
    """Split by input columns (o_proj, down_proj under TP, then all-reduce): groups stay inside a shard."""
    layer = _linear(512, 64, bias=False)
    x = torch.randn(3, 512)
    for make in (lambda w: Int8Linear(w, None), lambda w: Int4Linear(w, None, 64)):
        summed = sum(make(w.contiguous())(xs) for w, xs in zip(layer.weight.chunk(2, dim=1), x.chunk(2, dim=1),
                                                              strict=True))
        assert _rel(summed, layer(x)) < INT4_BOUND[64]
    # int4 groups of a shard are the whole layer's groups: the sum equals the unsharded int4 layer.
    whole = Int4Linear(layer.weight, None, 64)(x)
    halves = [Int4Linear(w.contiguous(), None, 64)(xs) for w, xs in zip(layer.weight.chunk(2, dim=1),
                                                                         x.chunk(2, dim=1), strict=True)]
    torch.testing.assert_close(halves[0] + halves[1], whole, rtol=0.02, atol=0.02)


def test_group_size_is_halved_to_divide_the_input_width() -> None:
    assert int4_group_size(1536, 128) == 128
    assert int4_group_size(576, 128) == 64  # the demo model's hidden size is 9 x 64
    assert int4_group_size(96, 128) == 32
    assert int4_group_size(40, 64) is None


def test_cuda_packing_puts_even_columns_in_the_high_nibble() -> None:
    q = torch.tensor([[1, 2, 15, 0], [7, 8, 9, 10]], dtype=torch.int32)
    packed = pack_int4_cuda(q)
    assert packed.dtype == torch.uint8
    assert packed.tolist() == [[0x12, 0xF0], [0x78, 0x9A]]


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(96, 64)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(64, 128), nn.SiLU(), nn.Linear(128, 64))
                                    for _ in range(2))
        self.odd = nn.Linear(40, 64)  # no int4 group fits 40 columns
        self.lm_head = nn.Linear(64, 96, bias=False)
        self.lm_head.weight = self.embed.weight  # tied, as in the demo model


@pytest.mark.parametrize(("method", "replaced"), [("int8", 6), ("int4", 5)])
def test_quantize_model_replaces_linear_layers_in_place(method: str, replaced: int) -> None:
    model = _Tiny()
    embedding = model.embed.weight.clone()
    assert quantize_model(model, method) == replaced
    kind = Int8Linear if method == "int8" else Int4Linear
    assert isinstance(model.blocks[1][2], kind) and isinstance(model.blocks[0][0], kind)
    assert isinstance(model.lm_head, Int8Linear)  # OUTPUT_LAYER_METHOD
    assert isinstance(model.odd, kind if method == "int8" else nn.Linear)
    assert torch.equal(model.embed.weight, embedding)  # a tied head's embedding keeps its float weights


def test_quantize_model_overrides_the_method_per_module() -> None:
    model = _Tiny()
    assert quantize_model(model, "int4", overrides={"lm_head": "int8", "blocks.0.2": None, "odd": "int8"}) == 5
    assert type(model.blocks[0][2]) is nn.Linear
    assert isinstance(model.lm_head, Int8Linear) and isinstance(model.odd, Int8Linear)
    assert isinstance(model.blocks[1][2], Int4Linear)


def test_quantize_model_none_leaves_the_model_alone() -> None:
    model = _Tiny()
    assert quantize_model(model, None) == 0
    assert quantize_model(model, "none") == 0
    assert isinstance(model.blocks[0][0], nn.Linear)


def test_unsupported_method_gets_tgis_error_form() -> None:
    with pytest.raises(ValueError, match="^gptq quantization not supported by "):
        quantize_model(_Tiny(), "gptq")
    assert quantize_method("INT4") == "int4"
