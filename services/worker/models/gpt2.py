"""GPT-2 and GPT-BigCode (StarCoder, SantaCoder): LayerNorm, learned positions, GELU MLP; BigCode adds multi-query."""

from __future__ import annotations

from services.worker.models.layers import DecoderArgs

MODEL_TYPES = ("gpt2", "gpt_bigcode")
# GPT-2 stores its projections as Conv1D weights, [in, out]: transposed relative to nn.Linear.
TRANSPOSED_TYPES = ("gpt2",)


def decoder_args(config: dict) -> DecoderArgs:
    if not config.get("scale_attn_weights", True) or config.get("scale_attn_by_inverse_layer_idx"):
        raise ValueError("GPT-2 attention without the 1/sqrt(head_dim) scale is not supported")
    heads, hidden = config["n_head"], config["n_embd"]
    bigcode = config["model_type"] == "gpt_bigcode"
    multi_query = bigcode and config.get("multi_query", True)
    return DecoderArgs(
        vocab_size=config["vocab_size"], hidden_size=hidden, intermediate_size=config.get("n_inner") or 4 * hidden,
        num_layers=config["n_layer"], num_heads=heads, num_kv_heads=1 if multi_query else heads,
        head_dim=hidden // heads, norm="layer", norm_eps=config.get("layer_norm_epsilon", 1e-5),
        position="learned", max_positions=config["n_positions"],
        # GPT-2's c_attn is q, k, v one after the other; BigCode's is that with multi-query, else per head.
        qkv_layout="grouped" if bigcode and not multi_query else "contiguous",
        qkv_bias=True, out_bias=True, gated_mlp=False,
        activation=config.get("activation_function", "gelu_pytorch_tanh" if bigcode else "gelu_new"), mlp_bias=True,
        tie_word_embeddings=config.get("tie_word_embeddings", True),
    )


def modules(args: DecoderArgs) -> dict[str, str | tuple[str, ...]]:
    layer = "transformer.h.{i}."
    return {
        "model.embed_tokens": "transformer.wte",
        "model.embed_positions": "transformer.wpe",
        "model.layers.{i}.attn_norm": layer + "ln_1",
        "model.layers.{i}.mlp_norm": layer + "ln_2",
        "model.layers.{i}.attn.qkv_proj": layer + "attn.c_attn",
        "model.layers.{i}.attn.o_proj": layer + "attn.c_proj",
        "model.layers.{i}.mlp.up_proj": layer + "mlp.c_fc",
        "model.layers.{i}.mlp.down_proj": layer + "mlp.c_proj",
        "model.norm": "transformer.ln_f",
        "lm_head": "lm_head",
    }

