"""Our Llama implementation and engine against transformers: logits, KV cache slots, greedy generation, TP."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, LlamaForCausalLM

from services.common.protocol import LogitsParams, NewSequence, Step, token_ids
from services.worker.checkpoint import load_model
from services.worker.config import WorkerConfig
from services.worker.engine import Engine, model_max_length, resolve_dtype
from services.worker.model import KVCache, ModelArgs, rope_inv_freq
from tests.conftest import build_tiny_llama

CPU = torch.device("cpu")
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}


def _new_cache(model, max_batch: int = 4, initial_capacity: int = 256, world_size: int = 1) -> KVCache:
    args = model.args
    return KVCache(args.num_layers, max_batch, args.num_kv_heads // world_size, args.head_dim, 256,
                   torch.float32, CPU, initial_capacity=initial_capacity)


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
    ids = torch.randint(0, model.args.vocab_size, (37,), generator=torch.Generator().manual_seed(0))
    cache = _new_cache(model)
    logits = model.prefill([ids], cache, 2, [True])[0]
    expected = _ref_logits(ref, ids.tolist())
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)
    last = model.prefill([ids], cache, 0, [False])[0]
    torch.testing.assert_close(last, expected[-1:], atol=1e-4, rtol=0)


def test_decode_with_joins_leaves_and_cache_growth(tiny_model_path):
    """Slots stay contiguous as sequences come and go; every row's logits match a full forward."""
    model, ref = load_model(tiny_model_path, torch.float32, CPU), _reference(tiny_model_path)
    cache = _new_cache(model, initial_capacity=4)
    gen = torch.Generator().manual_seed(1)
    running: list[list[int]] = []  # token ids per slot; the last one is not yet in the cache

    def join(length: int) -> None:
        ids = torch.randint(0, 1000, (length,), generator=gen)
        cache.ensure_capacity(length)
        logits = model.prefill([ids], cache, len(running), [False])[0]
        running.append([*ids.tolist(), int(logits.argmax())])

    def leave(slot: int) -> None:
        last = len(running) - 1
        if slot != last:
            cache.move(last, slot, len(running[last]) - 1)
            running[slot] = running[last]
        running.pop()

    join(3)
    join(6)
    for step in range(12):
        if step == 2:
            join(2)
        if step == 5:
            leave(0)
        if step == 7:
            join(9)
        lengths = torch.tensor([len(seq) - 1 for seq in running])
        cache.ensure_capacity(int(lengths.max()) + 1)
        logits = model.decode(torch.tensor([seq[-1] for seq in running]), lengths, cache)
        for row, seq in enumerate(running):
            torch.testing.assert_close(logits[row], _ref_logits(ref, seq)[-1], atol=1e-4, rtol=0)
            seq.append(int(logits[row].argmax()))
    assert cache.capacity == 32  # grew 4 -> 8 -> 16 -> 32


def test_sharded_checkpoint_loads(tiny_model_path, tmp_path):
    tensors = load_file(tiny_model_path / "model.safetensors")
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, part in halves.items():
        save_file({name: tensors[name] for name in part}, str(tmp_path / file), metadata={"format": "pt"})
    weight_map = {name: file for file, part in halves.items() for name in part}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (tmp_path / "config.json").write_text((tiny_model_path / "config.json").read_text())
    ids = torch.arange(1, 9)
    sharded = load_model(tmp_path, torch.float32, CPU)
    single = load_model(tiny_model_path, torch.float32, CPU)
    assert torch.equal(sharded.prefill([ids], _new_cache(sharded), 0, [True])[0],
                       single.prefill([ids], _new_cache(single), 0, [True])[0])


def test_unsupported_rope_is_a_clear_error():
    config = {"vocab_size": 10, "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
              "num_attention_heads": 2, "rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0}}
    with pytest.raises(ValueError, match="unsupported rope type 'yarn'"):
        rope_inv_freq(ModelArgs.from_config(config))


def _tp_rank(rank: int, world_size: int, path: Path, init_file: Path, out: Path) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        torch.set_num_threads(1)
        model = load_model(path, torch.float32, CPU, rank, world_size)
        cache = _new_cache(model, world_size=world_size)
        prefill = torch.cat(model.prefill([torch.arange(1, 6), torch.arange(1, 7)], cache, 0, [True, True]))
        decode = model.decode(torch.tensor([7, 8]), torch.tensor([5, 6]), cache)
        torch.save({"prefill": prefill, "decode": decode}, out / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_tensor_parallel_matches_single_rank(tmp_path, demo_model_path, monkeypatch):
    # With biases, so the row-parallel layers' bias-after-all-reduce is covered too.
    path = build_tiny_llama(tmp_path / "model", demo_model_path, seed=2, attention_bias=True, mlp_bias=True)
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")  # the spawned ranks talk over loopback
    mp.spawn(_tp_rank, args=(2, path, tmp_path / "rendezvous", tmp_path), nprocs=2, join=True)
    model = load_model(path, torch.float32, CPU)
    cache = _new_cache(model)
    prefill = torch.cat(model.prefill([torch.arange(1, 6), torch.arange(1, 7)], cache, 0, [True, True]))
    decode = model.decode(torch.tensor([7, 8]), torch.tensor([5, 6]), cache)
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(result["prefill"], prefill, atol=1e-5, rtol=0)
        torch.testing.assert_close(result["decode"], decode, atol=1e-5, rtol=0)


def _engine(path: Path, **overrides) -> Engine:
    return Engine(WorkerConfig(model_name=str(path), device="cpu", **overrides))


def _greedy(ref: LlamaForCausalLM, ids: list[int], count: int) -> list[int]:
    out = ref.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=count, min_new_tokens=count,
                       pad_token_id=0)
    return out[0, len(ids):].tolist()


def test_engine_greedy_matches_transformers_generate(tiny_model_path):
    engine, ref = _engine(tiny_model_path, max_batch_size=3), _reference(tiny_model_path)
    prompts = {"a": [5, 6, 7, 8], "b": [10, 11, 12, 13, 14, 15, 16], "c": [100, 200, 300], "d": [42]}
    joins = {0: ["a"], 2: ["b", "c"], 6: ["d"]}  # step -> sequences added then
    leaves = {5: ["a"], 9: ["b"]}
    got: dict[str, list[int]] = {rid: [] for rid in prompts}
    for step in range(12):
        add = [NewSequence(rid, token_ids(prompts[rid]), LogitsParams()) for rid in joins.get(step, [])]
        result = engine.step(Step(step, add, leaves.get(step, []), decode=step > 0))
        assert result.forward_ns > 0
        for output in result.outputs:
            got[output.request_id].append(output.token.token_id)
    assert [s.request_id for s in engine.sequences] == ["c", "d"]
    for rid, ids in prompts.items():
        assert got[rid] == _greedy(ref, ids, len(got[rid])), rid


def test_engine_limits_and_info(tiny_model_path):
    engine = _engine(tiny_model_path, max_batch_size=2, max_new_tokens=1000)
    info = engine.model_info()
    assert (info.max_sequence_length, info.max_new_tokens, info.max_batch_size) == (256, 255, 2)
    assert (info.device, info.dtype, info.world_size, info.encoder_decoder) == ("cpu", "float32", 1, False)
    assert (info.vocab_size, info.eos_token_id, info.pad_token_id) == (49152, 2, 2)
    too_long = NewSequence("long", token_ids(range(256)), LogitsParams())
    with pytest.raises(ValueError, match="max_sequence_length"):
        engine.step(Step(1, [too_long], [], decode=False))
    seqs = [NewSequence(str(i), token_ids([1, 2]), LogitsParams()) for i in range(3)]
    with pytest.raises(ValueError, match="batch full"):
        engine.step(Step(2, seqs, [], decode=False))
    assert engine.sequences == []  # a rejected step changes nothing
    engine.step(Step(3, seqs[:2], ["unknown"], decode=False))
    engine.reset()
    assert engine.step(Step(4, [], [], decode=True)).outputs == []


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
    tokens = [engine.step(Step(0, [NewSequence("r", token_ids(ids), LogitsParams())], [], False)).outputs[0]]
    tokens += [engine.step(Step(i, [], [], True)).outputs[0] for i in range(1, 6)]
    generated = [t.token.token_id for t in tokens]
    assert generated == _greedy(ref, ids, 6)
    assert tokenizer.decode(generated).startswith(" Paris.")


def test_min_new_tokens_and_length_penalty_edit_scores_in_place(tiny_model_path):
    """Regression: EOS masking writes into the model's logits, which must be allowed during a step."""
    from services.common.protocol import LogitsParams, NewSequence, Step, token_ids
    from services.worker.config import WorkerConfig
    from services.worker.engine import Engine

    engine = Engine(WorkerConfig(model_name=str(tiny_model_path), max_batch_size=2))
    params = LogitsParams(min_new_tokens=3, length_penalty_start=1, length_penalty_decay=2.0)
    result = engine.step(Step(1, [NewSequence("a", token_ids([1, 2, 3]), params)], [], False))
    assert len(result.outputs) == 1
    assert len(engine.step(Step(2, [], [], True)).outputs) == 1
