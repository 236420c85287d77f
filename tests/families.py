"""Tiny random-weight models of every `tgis_native` family, built with transformers and saved as safetensors."""

from __future__ import annotations

from pathlib import Path

import torch

from services.worker.kv_cache import PagedKVCache
from services.worker.paged_attention import PagedBatch, forward_context

CPU = torch.device("cpu")
VOCAB = 256
EOS = 1
COMMON = dict(vocab_size=VOCAB, bos_token_id=0, eos_token_id=EOS, pad_token_id=None, initializer_range=0.2)
LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128)
GPT2 = dict(n_embd=64, n_layer=2, n_head=4, n_positions=128)
FALCON = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128)

# Variant name -> (transformers config class name, its settings): one variant per architecture trait.
VARIANTS: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", LLAMA),
    "mistral": ("MistralConfig", {**LLAMA, "sliding_window": None}),
    "mistral-window": ("MistralConfig", {**LLAMA, "sliding_window": 4}),  # shorter than most test sequences
    "qwen2": ("Qwen2Config", LLAMA),
    "gpt_neox": ("GPTNeoXConfig", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, max_position_embeddings=128,
                                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                        "partial_rotary_factor": 0.5})),
    "gpt_neox-sequential": ("GPTNeoXConfig", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                  num_attention_heads=4, max_position_embeddings=128,
                                                  use_parallel_residual=False)),
    "gpt2": ("GPT2Config", GPT2),
    "gpt_bigcode": ("GPTBigCodeConfig", {**GPT2, "multi_query": True}),
    "gpt_bigcode-mha": ("GPTBigCodeConfig", {**GPT2, "multi_query": False}),
    "falcon": ("FalconConfig", {**FALCON, "multi_query": True, "parallel_attn": True}),
    "falcon-new-arch": ("FalconConfig", {**FALCON, "new_decoder_architecture": True, "num_kv_heads": 2}),
    "falcon-sequential": ("FalconConfig", {**FALCON, "multi_query": False, "parallel_attn": False, "bias": True}),
    "bloom": ("BloomConfig", dict(hidden_size=48, n_layer=2, n_head=6)),  # 6 heads: ALiBi slopes beyond 2^k
    "mpt": ("MptConfig", dict(d_model=64, n_heads=4, n_layers=2, max_seq_len=128,
                              attn_config={"clip_qkv": 6.0})),
}
# Architectures without a tgis_native implementation, for the hf_transformers engine.
HF_VARIANTS: dict[str, tuple[str, dict]] = {
    "opt": ("OPTConfig", dict(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                              max_position_embeddings=128, word_embed_proj_dim=64, init_std=0.2)),
    "gptj": ("GPTJConfig", dict(n_embd=64, n_layer=2, n_head=4, n_positions=128, rotary_dim=8)),
}
# Encoder-decoders for the end-to-end conformance suite (decoder start 0; BART without forced BOS/EOS, as TGIS).
SEQ2SEQ_VARIANTS: dict[str, tuple[str, dict]] = {
    "t5": ("T5Config", dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu",
                            decoder_start_token_id=0, pad_token_id=0)),
    "bart": ("BartConfig", dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                                decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                                max_position_embeddings=256, decoder_start_token_id=0, pad_token_id=0,
                                forced_eos_token_id=None, init_std=0.2)),
}
# One variant per trait under tensor parallelism: per-head fused QKV + parallel residual, MQA (KV copied on
# both ranks), grouped KV, ALiBi slopes split, Conv1D weights, separate q/k/v with GQA.
TP_VARIANTS = ("llama", "gpt_neox", "gpt_bigcode", "falcon-new-arch", "bloom", "gpt2")


def build_family_model(variant: str, target: Path, seed: int = 0) -> Path:
    """Save a random-weight transformers model of `variant` (config + safetensors) into `target`."""
    import transformers

    class_name, settings = VARIANTS.get(variant) or HF_VARIANTS[variant]
    config = getattr(transformers, class_name)(**COMMON, **settings)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(target, safe_serialization=True)
    return target


def build_with_tokenizer(variant: str, target: Path, tokenizer_source: Path, seed: int = 0, **overrides) -> Path:
    """`variant` (decoder or encoder-decoder) sized to the demo model's vocabulary, its tokenizer beside it (for
    end-to-end tests over text)."""
    import json
    import shutil

    import transformers

    from tests.conftest import TOKENIZER_FILES

    demo = json.loads((tokenizer_source / "config.json").read_text())
    class_name, settings = VARIANTS.get(variant) or HF_VARIANTS.get(variant) or SEQ2SEQ_VARIANTS[variant]
    config = getattr(transformers, class_name)(**{**COMMON, "vocab_size": demo["vocab_size"],
                                                  "bos_token_id": demo["bos_token_id"],
                                                  "eos_token_id": demo["eos_token_id"], **settings, **overrides})
    torch.manual_seed(seed)
    auto = transformers.AutoModelForSeq2SeqLM if config.is_encoder_decoder else transformers.AutoModelForCausalLM
    auto.from_config(config).eval().save_pretrained(target)
    for name in TOKENIZER_FILES:
        if (tokenizer_source / name).exists():
            shutil.copy(tokenizer_source / name, target / name)
    return target


def reference(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _logits(model, cache: PagedKVCache, runs: list[tuple[torch.Tensor, int, int]], tables) -> torch.Tensor:
    """Logits of the packed runs (tokens, start, count), decodes first, in the blocks `tables` list."""
    ids = torch.cat([tokens[start: start + count] for tokens, start, count in runs])
    positions = torch.cat([torch.arange(start, start + count) for _, start, count in runs])
    batch = PagedBatch.build(cache.block_size, tables, [r[1] for r in runs], [r[2] for r in runs], CPU)
    with forward_context(batch, cache):
        return model.logits(model(ids, positions))


def two_sequence_logits(model) -> torch.Tensor:
    """Logits of sequences a (12 tokens) and b (9) in scattered blocks: both prefill 5 tokens, then b decodes
    (first in each step) while a prefills a 4-token chunk and decodes; returns [a's 12 rows; b's 9 rows]."""
    cache = PagedKVCache(model.args.num_layers, 16, 4, model.kv_heads_per_rank, model.args.head_dim,
                         torch.float32, CPU)
    a, b = _sequences()
    tables = [[5, 0, 11], [9, 2, 14, 7]]  # b's, a's
    rows = _logits(model, cache, [(b, 0, 5), (a, 0, 5)], tables)
    out_b, out_a = [rows[:5]], [rows[5:]]
    for step, (a_start, a_count) in enumerate([(5, 4), (9, 1), (10, 1), (11, 1)]):
        rows = _logits(model, cache, [(b, 5 + step, 1), (a, a_start, a_count)], tables)
        out_b.append(rows[:1])
        out_a.append(rows[1:])
    return torch.cat(out_a + out_b)


def _sequences() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, VOCAB, (12,), generator=gen), torch.randint(0, VOCAB, (9,), generator=gen)


def expected_two_sequence_logits(ref) -> torch.Tensor:
    a, b = _sequences()
    with torch.no_grad():
        return torch.cat([ref(a[None]).logits[0], ref(b[None]).logits[0]])
