"""BLOOM: ALiBi positions, LayerNorm after the embedding, per-head fused QKV, GELU (tanh) MLP."""

from __future__ import annotations

from services.worker.models.layers import DecoderArgs

MODEL_TYPES = ("bloom",)


def decoder_args(config: dict) -> DecoderArgs:
    if config.get("apply_residual_connection_post_layernorm"):
        raise ValueError("BLOOM with apply_residual_connection_post_layernorm is not supported")
    heads = config.get("num_attention_heads") or config.get("n_head")
    hidden = config.get("hidden_size") or config["n_embed"]
    return DecoderArgs(
        vocab_size=config["vocab_size"], hidden_size=hidden, intermediate_size=4 * hidden,
        num_layers=config.get("num_hidden_layers") or config["n_layer"], num_heads=heads, num_kv_heads=heads,
        head_dim=hidden // heads, norm="layer", norm_eps=config.get("layer_norm_epsilon", 1e-5), position="alibi",
        qkv_layout="grouped", qkv_bias=True, out_bias=True, gated_mlp=False, activation="bloom_gelu",
        mlp_bias=True, embed_norm=True, tie_word_embeddings=config.get("tie_word_embeddings", True),
    )


def modules(args: DecoderArgs) -> dict[str, str | tuple[str, ...]]:
    layer = "transformer.h.{i}."
    return {
        "model.embed_tokens": "transformer.word_embeddings",
        "model.embed_norm": "transformer.word_embeddings_layernorm",
        "model.layers.{i}.attn_norm": layer + "input_layernorm",
        "model.layers.{i}.mlp_norm": layer + "post_attention_layernorm",
        "model.layers.{i}.attn.qkv_proj": layer + "self_attention.query_key_value",
        "model.layers.{i}.attn.o_proj": layer + "self_attention.dense",
        "model.layers.{i}.mlp.up_proj": layer + "mlp.dense_h_to_4h",
        "model.layers.{i}.mlp.down_proj": layer + "mlp.dense_4h_to_h",
        "model.norm": "transformer.ln_f",
        "lm_head": "lm_head",
    }
