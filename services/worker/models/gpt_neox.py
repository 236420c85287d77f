"""GPT-NeoX (Pythia, StableLM-alpha, ...): LayerNorm, partial rotary, per-head fused QKV, parallel residual, GELU."""

from __future__ import annotations

from services.worker.models.layers import DecoderArgs

MODEL_TYPES = ("gpt_neox",)


def decoder_args(config: dict) -> DecoderArgs:
    heads, hidden = config["num_attention_heads"], config["hidden_size"]
    head_dim = hidden // heads
    # rope_parameters (transformers >= 5) or the original rotary_pct / rotary_emb_base keys.
    rope = dict(config.get("rope_parameters") or {})
    rope.setdefault("rope_theta", config.get("rotary_emb_base", 10000.0))
    rope.setdefault("rope_type", "default")
    fraction = rope.get("partial_rotary_factor", config.get("rotary_pct", 1.0))
    bias = config.get("attention_bias", True)
    return DecoderArgs(
        vocab_size=config["vocab_size"], hidden_size=hidden, intermediate_size=config["intermediate_size"],
        num_layers=config["num_hidden_layers"], num_heads=heads, num_kv_heads=heads, head_dim=head_dim,
        norm="layer", norm_eps=config.get("layer_norm_eps", 1e-5), position="rope", rope=rope,
        rotary_dim=int(head_dim * fraction), qkv_layout="grouped", qkv_bias=bias, out_bias=bias,
        gated_mlp=False, activation=config.get("hidden_act", "gelu"), mlp_bias=True,
        residual="parallel" if config.get("use_parallel_residual", True) else "sequential",
        tie_word_embeddings=config.get("tie_word_embeddings", False),
    )


def modules(args: DecoderArgs) -> dict[str, str | tuple[str, ...]]:
    layer = "gpt_neox.layers.{i}."
    return {
        "model.embed_tokens": "gpt_neox.embed_in",
        "model.layers.{i}.attn_norm": layer + "input_layernorm",
        "model.layers.{i}.mlp_norm": layer + "post_attention_layernorm",
        "model.layers.{i}.attn.qkv_proj": layer + "attention.query_key_value",
        "model.layers.{i}.attn.o_proj": layer + "attention.dense",
        "model.layers.{i}.mlp.up_proj": layer + "mlp.dense_h_to_4h",
        "model.layers.{i}.mlp.down_proj": layer + "mlp.dense_4h_to_h",
        "model.norm": "gpt_neox.final_layer_norm",
        "lm_head": "embed_out",
    }
