"""Tiny random-weight models of every `tgis_native` family, built with transformers and saved as safetensors."""

from __future__ import annotations

from pathlib import Path

import torch

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
# One variant per trait under tensor parallelism: per-head fused QKV + parallel residual, MQA (KV copied on
# both ranks), grouped KV, ALiBi slopes split, Conv1D weights, separate q/k/v with GQA.
TP_VARIANTS = ("llama", "gpt_neox", "gpt_bigcode", "falcon-new-arch", "bloom", "gpt2")


def build_family_model(variant: str, target: Path, seed: int = 0) -> Path:
    """Save a random-weight transformers model of `variant` (config + safetensors) into `target`."""
    import transformers

    class_name, settings = VARIANTS[variant]
    config = getattr(transformers, class_name)(**COMMON, **settings)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(target, safe_serialization=True)
    return target


def reference(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
