"""Falcon (and its RefinedWeb / RefinedWebModel names): LayerNorm, rotary, MQA or grouped KV, parallel attention."""

from __future__ import annotations

from services.worker.models.layers import DecoderArgs

MODEL_TYPES = ("falcon", "RefinedWeb", "RefinedWebModel")


def decoder_args(config: dict) -> DecoderArgs:
    # RefinedWeb (Falcon-40B) is the new decoder architecture, RefinedWebModel (Falcon-7B) the old one.
    new_arch = config.get("new_decoder_architecture", config["model_type"] == "RefinedWeb")
    heads = config.get("num_attention_heads") or config["n_head"]
    hidden = config["hidden_size"]
    if config.get("alibi"):
        raise ValueError("Falcon with ALiBi positions is not supported")
    parallel = config.get("parallel_attn", True)
    if new_arch and not parallel:
        raise ValueError("Falcon's new decoder architecture without parallel attention is not supported")
    if new_arch:
        kv_heads = config.get("num_kv_heads") or config.get("n_head_kv") or heads
    elif config.get("multi_query", True):
        kv_heads = 1
    else:
        kv_heads = heads
    two_norms = new_arch and config.get("num_ln_in_parallel_attn") in (None, 2)
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    rope.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    rope["rope_type"] = rope.get("rope_type", rope.get("type", "default"))
    return DecoderArgs(
        vocab_size=config["vocab_size"], hidden_size=hidden,
        intermediate_size=config.get("ffn_hidden_size") or 4 * hidden,
        num_layers=config.get("num_hidden_layers") or config["n_layer"], num_heads=heads, num_kv_heads=kv_heads,
        head_dim=hidden // heads, norm="layer", norm_eps=config.get("layer_norm_epsilon", 1e-5), position="rope",
        rope=rope,
        # The new architecture groups each KV head's queries with it; the old one is per head, or q then k, v (MQA).
        qkv_layout="grouped" if new_arch or kv_heads == heads else "contiguous",
        qkv_bias=config.get("bias", False), out_bias=config.get("bias", False), gated_mlp=False,
        activation=config.get("activation", "gelu"), mlp_bias=config.get("bias", False),
        residual=("parallel" if two_norms else "parallel_shared") if parallel else "sequential",
        tie_word_embeddings=config.get("tie_word_embeddings", True),
    )


def modules(args: DecoderArgs) -> dict[str, str | tuple[str, ...]]:
    layer = "transformer.h.{i}."
    two_norms = args.residual == "parallel"
    return {
        "model.embed_tokens": "transformer.word_embeddings",
        "model.layers.{i}.attn_norm": layer + ("ln_attn" if two_norms else "input_layernorm"),
        "model.layers.{i}.mlp_norm": layer + ("ln_mlp" if two_norms else "post_attention_layernorm"),
        "model.layers.{i}.attn.qkv_proj": layer + "self_attention.query_key_value",
        "model.layers.{i}.attn.o_proj": layer + "self_attention.dense",
        "model.layers.{i}.mlp.up_proj": layer + "mlp.dense_h_to_4h",
        "model.layers.{i}.mlp.down_proj": layer + "mlp.dense_4h_to_h",
        "model.norm": "transformer.ln_f",
        "lm_head": "lm_head",
    }
