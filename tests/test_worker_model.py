"""Our Llama implementation and engine against transformers: logits, paged KV cache, greedy generation, TP."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, LlamaForCausalLM

from services.worker.checkpoint import load_model
from services.worker.config import WorkerConfig
from services.worker.engine import Engine
from services.worker.kv_cache import PagedKVCache
from services.worker.model_config import model_max_length, resolve_dtype
from services.worker.models.layers import rope_inv_freq
from services.worker.paged_attention import PagedBatch, forward_context
from tests.conftest import build_tiny_llama
from tests.local_engine import LocalEngine
from tests.tensor_parallel import on_two_ranks

CPU = torch.device("cpu")
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}


def _new_cache(model, num_blocks: int = 64, block_size: int = 4) -> PagedKVCache:
    args = model.args
    dtype = model.model.embed_tokens.weight.dtype  # the cache holds K/V in the model's dtype
    return PagedKVCache(args.num_layers, num_blocks, block_size, model.kv_heads_per_rank, args.head_dim, dtype, CPU)


def _forward(model, cache: PagedKVCache, runs: list[tuple[list[int], int, int]], tables: list[list[int]]) -> torch.Tensor:
    """Logits [T, vocab] of the packed runs (tokens, start, count) whose blocks `tables` list."""
    ids = [t for tokens, start, count in runs for t in tokens[start: start + count]]
    positions = [p for _, start, count in runs for p in range(start, start + count)]
    batch = PagedBatch.build(cache.block_size, tables, [r[1] for r in runs], [r[2] for r in runs], CPU)
    with forward_context(batch, cache):
        return model.logits(model(torch.tensor(ids), torch.tensor(positions)))


def _prefill(model, ids: list[int], blocks: int = 16) -> torch.Tensor:
    cache = _new_cache(model, num_blocks=blocks)
    return _forward(model, cache, [(ids, 0, len(ids))], [list(range(blocks))])


def _reference(path: Path) -> LlamaForCausalLM:
    return LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _ref_logits(ref: LlamaForCausalLM, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return ref(torch.tensor([ids])).logits[0]


@pytest.fixture(scope="module", params=["default", "biases", "llama3"])
def variant_path(request, tmp_path_factory, demo_model_path) -> Path:
    overrides = {
        "default": {},
        "biases": {"attention_bias": True, "mlp_bias": True},
        "llama3": {"rope_parameters": LLAMA3_ROPE},
    }[request.param]
    return build_tiny_llama(tmp_path_factory.mktemp(request.param), demo_model_path, seed=1, **overrides)


def test_prefill_logits_match_transformers(variant_path):
    model, ref = load_model(variant_path, torch.float32, CPU), _reference(variant_path)
    ids = torch.randint(0, model.args.vocab_size, (37,), generator=torch.Generator().manual_seed(0)).tolist()
    torch.testing.assert_close(_prefill(model, ids), _ref_logits(ref, ids), atol=1e-4, rtol=0)


def test_chunks_and_decodes_over_scattered_blocks_match_transformers(tiny_model_path):
    """Sequences in non-contiguous, interleaved blocks, prefilled in chunks beside decodes: every logit matches."""
    model, ref = load_model(tiny_model_path, torch.float32, CPU), _reference(tiny_model_path)
    cache = _new_cache(model, num_blocks=32, block_size=4)
    gen = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, 1000, (n,), generator=gen).tolist() for n in (9, 3, 14)]
    tables = [[5, 17, 2, 30, 11], [8, 1, 25, 4], [0, 9, 21, 3, 6, 14]]
    computed = [0, 0, 0]
    for chunk in (4, 5, 16):  # first chunks, then the rest, then decodes
        runs, order = [], []
        for i, ids in enumerate(seqs):
            if computed[i] < len(ids):
                count = min(chunk, len(ids) - computed[i])
                runs.append((ids, computed[i], count))
                order.append(i)
        decodes = [k for k, (ids, start, count) in enumerate(runs) if count == 1 and start > 0]
        runs = [runs[k] for k in decodes] + [r for k, r in enumerate(runs) if k not in decodes]
        order = [order[k] for k in decodes] + [o for k, o in enumerate(order) if k not in decodes]
        logits = _forward(model, cache, runs, [tables[i] for i in order])
        row = 0
        for i, (ids, start, count) in zip(order, runs, strict=True):
            expected = _ref_logits(ref, ids[: start + count])[start:]
            torch.testing.assert_close(logits[row: row + count], expected, atol=1e-4, rtol=0)
            row += count
            computed[i] = start + count
            if computed[i] == len(ids):
                ids.append(int(logits[row - 1].argmax()))


def test_sharded_checkpoint_loads(tiny_model_path, tmp_path):
    tensors = load_file(tiny_model_path / "model.safetensors")
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, part in halves.items():
        save_file({name: tensors[name] for name in part}, str(tmp_path / file), metadata={"format": "pt"})
    weight_map = {name: file for file, part in halves.items() for name in part}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (tmp_path / "config.json").write_text((tiny_model_path / "config.json").read_text())
    ids = list(range(1, 9))
    sharded = load_model(tmp_path, torch.float32, CPU)
    single = load_model(tiny_model_path, torch.float32, CPU)
    assert torch.equal(_prefill(sharded, ids), _prefill(single, ids))


def test_unsupported_rope_is_a_clear_error():
    with pytest.raises(ValueError, match="unsupported rope type 'yarn'"):
        rope_inv_freq({"rope_type": "yarn", "rope_theta": 10000.0}, 8)


def _tp_logits(model) -> dict[str, torch.Tensor]:
    cache = _new_cache(model)
    a, b = list(range(1, 6)), list(range(1, 7))
    prefill = _forward(model, cache, [(a, 0, 5), (b, 0, 6)], [[0, 1], [2, 3]])
    decode = _forward(model, cache, [([*a, 7], 5, 1), ([*b, 8], 6, 1)], [[0, 1], [2, 3]])
    return {"prefill": prefill, "decode": decode}


def _rank_tp_logits(rank: int, world_size: int, path: Path) -> dict[str, torch.Tensor]:
    return _tp_logits(load_model(path, torch.float32, CPU, rank, world_size))


def test_tensor_parallel_matches_single_rank(tmp_path, demo_model_path):
    # With biases, so the row-parallel layers' bias-after-all-reduce is covered too.
    path = build_tiny_llama(tmp_path / "model", demo_model_path, seed=2, attention_bias=True, mlp_bias=True)
    expected = _tp_logits(load_model(path, torch.float32, CPU))
    for result in on_two_ranks(_rank_tp_logits, path, folder=tmp_path):
        for name in ("prefill", "decode"):
            torch.testing.assert_close(result[name], expected[name], atol=1e-5, rtol=0)


def _engine(path: Path, **overrides) -> Engine:
    return Engine(WorkerConfig(model_name=str(path), device="cpu", kv_cache_memory="512MiB", **overrides))


def _greedy(ref: LlamaForCausalLM, ids: list[int], count: int) -> list[int]:
    # An explicit mask: generate() would otherwise take prompt ids equal to the pad id for padding.
    out = ref.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), do_sample=False,
                       max_new_tokens=count, min_new_tokens=count, pad_token_id=0)
    return out[0, len(ids):].tolist()


def test_engine_limits_and_info(tiny_model_path):
    engine = _engine(tiny_model_path, max_batch_size=2, max_new_tokens=1000)
    info = engine.model_info()
    assert (info.max_sequence_length, info.max_new_tokens, info.max_batch_size) == (256, 255, 2)
    assert (info.device, info.dtype, info.world_size, info.encoder_decoder) == ("cpu", "float32", 1, False)
    assert (info.vocab_size, info.eos_token_id, info.pad_token_id) == (49152, 2, 2)
    assert engine.cache.block_size == 16 and engine.cache.num_blocks >= 256 // 16


def test_config_helpers():
    assert model_max_length({"n_positions": 1024, "seq_length": 4}) == 1024
    assert model_max_length({"max_position_embeddings": None}) == 2048
    assert resolve_dtype(None, CPU) == torch.float32
    assert resolve_dtype(None, torch.device("cuda")) == torch.float16
    assert resolve_dtype("bfloat16", CPU) == torch.bfloat16
    with pytest.raises(ValueError, match="Unrecognized data type: half"):
        resolve_dtype("half", CPU)


@pytest.mark.demo_model
def test_demo_model_says_paris(demo_model_path):
    engine, ref = _engine(demo_model_path, max_batch_size=1), _reference(demo_model_path)
    tokenizer = AutoTokenizer.from_pretrained(demo_model_path)
    ids = tokenizer("The capital of France is")["input_ids"]
    generated = LocalEngine(engine).generate({"r": ids}, max_new_tokens=6)["r"]
    assert generated == _greedy(ref, ids, 6)
    assert tokenizer.decode(generated).startswith(" Paris.")
