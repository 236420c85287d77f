"""MPT (MosaicML): ALiBi positions, bias-free LayerNorm and linears, fused QKV (optionally clipped), GELU MLP."""

from __future__ import annotations

from services.worker.models.layers import DecoderArgs

MODEL_TYPES = ("mpt",)


def decoder_args(config: dict) -> DecoderArgs:
    attn = config.get("attn_config") or {}
    unsupported = [key for key in ("qk_ln", "prefix_lm", "attn_uses_sequence_id") if attn.get(key)]
    if not attn.get("alibi", True):
        unsupported.append("alibi=false (learned positions)")
    if attn.get("softmax_scale") is not None:
        unsupported.append("softmax_scale")
    if config.get("logit_scale") is not None:
        unsupported.append("logit_scale")
    if unsupported:
        raise ValueError(f"MPT attention options not supported: {', '.join(unsupported)}")
    heads, hidden = config["n_heads"], config["d_model"]
    return DecoderArgs(
        vocab_size=config["vocab_size"], hidden_size=hidden,
        intermediate_size=int(config.get("expansion_ratio", 4) * hidden), num_layers=config["n_layers"],
        # No biases anywhere, whatever no_bias says (as transformers builds it).
        num_heads=heads, num_kv_heads=heads, head_dim=hidden // heads,
        norm="layer", norm_eps=config.get("layer_norm_epsilon", 1e-5), norm_bias=False,
        position="alibi", alibi_bias_max=attn.get("alibi_bias_max", 8), qkv_layout="contiguous",
        qkv_clip=attn.get("clip_qkv"), gated_mlp=False, activation="gelu",
        tie_word_embeddings=config.get("tie_word_embeddings", True),
    )


def modules(args: DecoderArgs) -> dict[str, str | tuple[str, ...]]:
    layer = "transformer.blocks.{i}."
    return {
        "model.embed_tokens": "transformer.wte",
        "model.layers.{i}.attn_norm": layer + "norm_1",
        "model.layers.{i}.mlp_norm": layer + "norm_2",
        "model.layers.{i}.attn.qkv_proj": layer + "attn.Wqkv",
        "model.layers.{i}.attn.o_proj": layer + "attn.out_proj",
        "model.layers.{i}.mlp.up_proj": layer + "ffn.up_proj",
        "model.layers.{i}.mlp.down_proj": layer + "ffn.down_proj",
        "model.norm": "transformer.norm_f",
        "lm_head": "lm_head",
    }
