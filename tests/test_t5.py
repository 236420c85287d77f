"""T5 on the paged engine against transformers on the same random weights: logits, generate(), TGIS's seq2seq rules."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from services.common.protocol import (
    GenerateRequest,
    LogitsParams,
    NewSequence,
    ScheduledChunk,
    Step,
    StopParams,
    token_ids,
)
from services.worker.checkpoint import load_model
from services.worker.config import WorkerConfig
from services.worker.engine import Engine
from services.worker.kv_cache import PagedKVCache, bytes_per_token
from services.worker.paged_attention import PagedBatch, forward_context
from tests.local_engine import LocalEngine
from tests.tensor_parallel import on_two_ranks

CPU = torch.device("cpu")
VOCAB, EOS, NEW = 256, 1, 8
PROMPTS = {"a": [5, 17, 42, 99, 3, 250, 7, EOS], "b": [11, 2, EOS], "c": [*range(30, 50), EOS]}
# t5: ReLU MLP, output scaled before the tied LM head; flan: gated GELU (T5 v1.1), no scaling; mt5 (mT5, mt0).
VARIANTS = {"t5": {"feed_forward_proj": "relu"},
            "flan": {"feed_forward_proj": "gated-gelu", "tie_word_embeddings": False},
            "mt5": {"feed_forward_proj": "gated-gelu", "kind": "MT5"}}


def build_t5(target: Path, seed: int = 0, kind: str = "T5", **settings) -> Path:
    import transformers

    config = getattr(transformers, f"{kind}Config")(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=3, num_heads=4,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=EOS, **settings)
    torch.manual_seed(seed)
    getattr(transformers, f"{kind}ForConditionalGeneration")(config).eval().save_pretrained(target)
    return target


def _reference(path: Path):
    from transformers import AutoModelForSeq2SeqLM

    return AutoModelForSeq2SeqLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.fixture(scope="module", params=list(VARIANTS))
def t5_path(request, tmp_path_factory) -> Path:
    """Each variant: the logits test runs on all of them (their differences are in the model's arithmetic)."""
    return build_t5(tmp_path_factory.mktemp(request.param), seed=1, **VARIANTS[request.param])


@pytest.fixture(scope="module")
def flan_path(tmp_path_factory) -> Path:
    """One variant for the engine-level tests, which exercise the engine's seq2seq path, the same for all."""
    return build_t5(tmp_path_factory.mktemp("flan-engine"), seed=1, **VARIANTS["flan"])


def _decoder_logits(model, encoder_ids: torch.Tensor, decoder_ids: torch.Tensor) -> torch.Tensor:
    """Our logits of every decoder position: the first three in one chunk, then decodes, in scattered blocks."""
    cross = model.encode(model.embed(encoder_ids))
    cache = PagedKVCache(model.args.num_layers, 8, 4, model.kv_heads_per_rank, model.args.head_dim,
                         torch.float32, CPU)
    out, table = [], [6, 2, 5]
    for start, count in [(0, 3), *((p, 1) for p in range(3, len(decoder_ids)))]:
        batch = PagedBatch.build(4, [table], [start], [count], CPU)
        with forward_context(batch, cache):
            hidden = model.decode(model.embed(decoder_ids[start: start + count]), torch.arange(start, start + count),
                                  [(0, count, cross)])
        out.append(model.logits(hidden))
    return torch.cat(out)


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.randint(2, VOCAB, (9,), generator=gen), torch.cat([torch.zeros(1, dtype=torch.long),
                                                                     torch.randint(2, VOCAB, (6,), generator=gen)])


def test_logits_match_transformers(t5_path):
    model, ref = load_model(t5_path, torch.float32, CPU), _reference(t5_path)
    encoder_ids, decoder_ids = _inputs()
    with torch.no_grad():
        expected = ref(input_ids=encoder_ids[None], decoder_input_ids=decoder_ids[None]).logits[0]
    torch.testing.assert_close(_decoder_logits(model, encoder_ids, decoder_ids), expected, atol=1e-4, rtol=0)


def _generate(ref, ids: list[int], **kwargs) -> list[int]:
    # use_cache=False: transformers 5.24 sizes T5's generation cache by encoder layers (3 decoder layers here).
    out = ref.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                       do_sample=False, max_new_tokens=NEW, min_new_tokens=NEW, use_cache=False, **kwargs)
    return out[0, 1:].tolist()  # after the decoder start token


def _engine(path: Path) -> Engine:
    return Engine(WorkerConfig(model_name=str(path), device="cpu", kv_cache_memory="16MiB", kv_block_size=4))


def test_greedy_equals_generate_singly_batched_chunked_and_preempted(flan_path):
    ref, engine = _reference(flan_path), _engine(flan_path)
    assert engine.model_info().encoder_decoder
    expected = {rid: _generate(ref, ids) for rid, ids in PROMPTS.items()}
    params = LogitsParams(min_new_tokens=NEW)
    assert LocalEngine(engine, prefix_caching=False).generate({"a": PROMPTS["a"]}, NEW, params) == {"a": expected["a"]}
    # Encoder inputs arrive in 4-token chunks beside other sequences' decodes.
    chunked = LocalEngine(engine, prefix_caching=False, max_prefill_tokens=4)
    assert chunked.generate(PROMPTS, NEW, params) == expected
    # Too few blocks for all three at once: some are preempted and recomputed from their first position.
    tight = LocalEngine(engine, prefix_caching=False, num_blocks=10)
    assert tight.generate(PROMPTS, NEW, params) == expected
    assert tight.counters["preemptions"] > 0


def test_repetition_penalty_sees_decoder_ids_only(flan_path):
    ref, engine = _reference(flan_path), _engine(flan_path)
    got = LocalEngine(engine, prefix_caching=False).generate(
        {"c": PROMPTS["c"]}, NEW, LogitsParams(min_new_tokens=NEW, repetition_penalty=2.0))
    assert got["c"] == _generate(ref, PROMPTS["c"], repetition_penalty=2.0)


def test_input_details_are_encoder_ids_with_nan_logprobs(flan_path):
    engine, ids = _engine(flan_path), PROMPTS["a"]
    params = LogitsParams(input_details=True, token_logprobs=True, token_ranks=True, top_n_tokens=2)
    result = engine.step(Step(1, [NewSequence("r", token_ids(ids), params)], [],
                              [ScheduledChunk("r", 0, len(ids), token_ids([0, 1]))]))
    details = result.outputs[0].input_details
    assert [d.token_id for d in details] == ids
    assert all(math.isnan(d.logprob) and d.rank == 0 and not len(d.top_ids) for d in details)


def test_cross_attention_kv_counts_in_the_kv_cache_budget(flan_path):
    """KV_CACHE_MEMORY holds the decoder's blocks and the cross-attention K/V: a sequence's cross K/V is its
    encoder length at the blocks' per-token size, and its blocks cover that length, so the pool takes half."""
    engine, ids = _engine(flan_path), PROMPTS["c"]  # 16 MiB, blocks of 4
    args = engine.model.args
    per_token = bytes_per_token(args.num_layers, engine.model.kv_heads_per_rank, args.head_dim, torch.float32)
    assert engine.cache.num_blocks == 8 * 2**20 // (4 * per_token)
    table = list(range(-(-len(ids) // 4)))
    engine.step(Step(1, [NewSequence("r", token_ids(ids), LogitsParams())], [],
                     [ScheduledChunk("r", 0, len(ids), token_ids(table))]))
    cross = sum(t.numel() * t.element_size() for kv in engine.sequences["r"].cross for t in kv)
    assert cross == len(ids) * per_token <= len(table) * 4 * per_token


def _prefixed_greedy(ref, ids: list[int], encoder: torch.Tensor | None, decoder: torch.Tensor | None) -> list[int]:
    """TGIS's prefix semantics in transformers: encoder rows before the input's embeddings, decoder rows before the
    decoder start token's; greedy without a cache, EOS held back for NEW tokens (min_new_tokens)."""
    embed = ref.get_input_embeddings()
    with torch.no_grad():
        x = embed(torch.tensor(ids))
        x = x if encoder is None else torch.cat([encoder, x])
        tokens, out = [0], []
        for _ in range(NEW):
            y = embed(torch.tensor(tokens))
            y = y if decoder is None else torch.cat([decoder, y])
            logits = ref(inputs_embeds=x[None], decoder_inputs_embeds=y[None]).logits[0, -1]
            logits[EOS] = -math.inf
            tokens.append(int(logits.argmax()))
            out.append(tokens[-1])
    return out


def test_encoder_and_decoder_prompt_prefixes_equal_transformers(flan_path, tmp_path):
    gen = torch.Generator().manual_seed(4)
    parts = {"both": ("encoder.pt", "decoder.pt"), "enc": ("encoder.pt",), "dec": ("decoder.pt",)}
    for prefix_id, files in parts.items():
        (tmp_path / prefix_id).mkdir()
        for name in files:
            torch.save(torch.randn(4 if name == "encoder.pt" else 2, 32, generator=gen), tmp_path / prefix_id / name)
    engine = Engine(WorkerConfig(model_name=str(flan_path), device="cpu", kv_cache_memory="16MiB", kv_block_size=4,
                                 prefix_store_path=str(tmp_path)))
    lengths = {"both": 4 + 2 + 1, "enc": 4, "dec": 2 + 1}  # TGIS: encoder rows + decoder rows + the start token
    requests = [GenerateRequest(f"{rid}-{pid}", token_ids([0] * lengths[pid] + PROMPTS[rid]),
                                LogitsParams(min_new_tokens=NEW), StopParams(NEW, NEW), 0.0, pid, lengths[pid])
                for rid, pid in [("a", "both"), ("b", "enc"), ("c", "dec"), ("b", "both")]]
    local = LocalEngine(engine, prefix_caching=False, max_prefill_tokens=8)
    local.batcher.submit(b"local", requests)
    got = local.run({r.request_id: [] for r in requests})
    ref = _reference(flan_path)
    for r in requests:
        folder = tmp_path / r.prefix_id
        encoder, decoder = (torch.load(folder / name) if (folder / name).exists() else None
                            for name in ("encoder.pt", "decoder.pt"))
        assert got[r.request_id] == _prefixed_greedy(ref, PROMPTS[r.request_id[0]], encoder, decoder), r.request_id


def _tp_logits(rank: int, world_size: int, path: Path) -> torch.Tensor:
    return _decoder_logits(load_model(path, torch.float32, CPU, rank, world_size), *_inputs())


def test_tensor_parallel_matches_single_rank(tmp_path):
    path = build_t5(tmp_path / "model", seed=2, **VARIANTS["flan"])
    expected = _decoder_logits(load_model(path, torch.float32, CPU), *_inputs())
    for result in on_two_ranks(_tp_logits, path, folder=tmp_path):
        torch.testing.assert_close(result, expected, atol=1e-5, rtol=0)


def test_int8_quantizes_t5_linear_layers(flan_path):
    model = load_model(flan_path, torch.float32, CPU, quantize="int8")
    assert not [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    encoder_ids, decoder_ids = _inputs()
    with torch.no_grad():
        expected = _reference(flan_path)(input_ids=encoder_ids[None], decoder_input_ids=decoder_ids[None]).logits[0]
    got = _decoder_logits(model, encoder_ids, decoder_ids)
    assert (got - expected).abs().max() < 0.05 * expected.abs().max()
