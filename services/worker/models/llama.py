"""Llama-style families (llama, mistral, qwen2): RMSNorm, rotary, GQA, gated SiLU MLP, separate q/k/v in checkpoints."""

from __future__ import annotations

from services.worker.models.layers import DecoderArgs

MODEL_TYPES = ("llama", "mistral", "qwen2")


def rope_settings(config: dict) -> dict:
    """rope_parameters (transformers >= 5) or rope_theta + rope_scaling (older configs), normalized."""
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    rope.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    rope["rope_type"] = rope.get("rope_type", rope.get("type", "default"))
    rope.setdefault("original_max_position_embeddings", config.get("max_position_embeddings"))
    return rope


def decoder_args(config: dict) -> DecoderArgs:
    if config.get("hidden_act", "silu") != "silu":
        raise ValueError(f"unsupported hidden_act {config['hidden_act']!r}")
    heads = config["num_attention_heads"]
    qwen2 = config["model_type"] == "qwen2"
    bias = config.get("attention_bias", False)
    return DecoderArgs(
        vocab_size=config["vocab_size"], hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"], num_layers=config["num_hidden_layers"],
        num_heads=heads, num_kv_heads=config.get("num_key_value_heads") or heads,
        head_dim=config.get("head_dim") or config["hidden_size"] // heads,
        norm="rms", norm_eps=config.get("rms_norm_eps", 1e-6), position="rope", rope=rope_settings(config),
        # Qwen2 has biases on q/k/v only.
        qkv_bias=qwen2 or bias, out_bias=bias and not qwen2, mlp_bias=config.get("mlp_bias", False),
        tie_word_embeddings=config.get("tie_word_embeddings", False),
        **sliding_window(config),
    )


def sliding_window(config: dict) -> dict:
    """DecoderArgs' sliding_window and sliding_layers, as transformers reads them: Mistral's window applies to every
    layer, Qwen2's (when use_sliding_window) from layer max_window_layers on; a config's layer_types say it per layer."""
    window, layers = config.get("sliding_window"), config["num_hidden_layers"]
    if not window or not config.get("use_sliding_window", config["model_type"] == "mistral"):
        return {}
    if config.get("layer_types"):
        sliding = tuple(i for i, kind in enumerate(config["layer_types"]) if kind == "sliding_attention")
    else:
        first = config.get("max_window_layers", 0) if config["model_type"] == "qwen2" else 0
        sliding = tuple(range(first, layers))
    return {"sliding_window": window, "sliding_layers": sliding}


def modules(args: DecoderArgs) -> dict[str, str | tuple[str, ...]]:
    layer = "model.layers.{i}."
    return {
        "model.embed_tokens": "model.embed_tokens",
        "model.layers.{i}.attn_norm": layer + "input_layernorm",
        "model.layers.{i}.mlp_norm": layer + "post_attention_layernorm",
        "model.layers.{i}.attn.qkv_proj": tuple(layer + f"self_attn.{p}_proj" for p in "qkv"),
        "model.layers.{i}.attn.o_proj": layer + "self_attn.o_proj",
        "model.layers.{i}.mlp.up_proj": (layer + "mlp.gate_proj", layer + "mlp.up_proj"),
        "model.layers.{i}.mlp.down_proj": layer + "mlp.down_proj",
        "model.norm": "model.norm",
        "lm_head": "lm_head",
    }
