"""The `hf_transformers` engine's model: any causal LM transformers loads offline, attending through our paged cache.

transformers lets a model's attention be swapped by name (`AttentionInterface`);
ours, `tgis_paged`, hands each layer's query, key and value to
`paged_attention.attend`, so the model runs on the same packed steps, KV
blocks, chunked prefill, prefix caching and sampling as `tgis_native` models
(hence every TGIS feature), while its own code does everything else
(embeddings, rotary or learned positions, norms, MLPs).  The step's tokens go
in as one batch row with their positions; no transformers cache is kept and
no mask is built (the paged attention masks by position).  Slower than a
native family (no fused projections, no tensor parallelism), but it serves
architectures without one.  Models whose attention does not go through
transformers' attention interface, and those with attention features ours
lacks (logit soft-capping), are refused at load; sliding windows come with
each layer's call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from services.worker.paged_attention import attend

ATTENTION = "tgis_paged"


def _paged_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                     **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention signature: query [1, heads, T, d], key/value [1, kv_heads, T, d] -> [1, T, heads, d]."""
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))
    if scaling is not None:  # attend() scales by 1/sqrt(d); fold any other scale into the queries
        q = q * (scaling * math.sqrt(q.shape[-1]))
    # Models with sliding-window layers pass the window here (as they do for flash attention); our mask is none.
    return attend(q.contiguous(), k.contiguous(), v.contiguous(), module.layer_idx,
                  sliding_window=kwargs.get("sliding_window"))[None], None


def _no_mask(*args, **kwargs) -> None:
    return None


def register_attention() -> None:
    """Make `tgis_paged` known to transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTENTION, _paged_attention)
    AttentionMaskInterface.register(ATTENTION, _no_mask)


@dataclass(frozen=True)
class HFArgs:
    """The sizes the engine needs (KV cache shape, vocabulary, embedding width), read from the transformers config."""

    vocab_size: int
    hidden_size: int  # of the input embeddings (what prompt prefixes must match; OPT-350m's differs from d_model)
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @classmethod
    def from_config(cls, config, embedding_width: int) -> HFArgs:
        text = config.get_text_config()
        heads = text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        return cls(text.vocab_size, embedding_width, text.num_hidden_layers, heads,
                   getattr(text, "num_key_value_heads", None) or heads, head_dim)


def _check_supported(config) -> None:
    text = config.get_text_config()
    if getattr(text, "attn_logit_softcapping", None) or getattr(text, "final_logit_softcapping", None):
        raise ValueError(f"{config.model_type}: logit soft-capping is not supported by the hf_transformers engine")
    if getattr(text, "logit_scale", None) not in (None, 1, 1.0):
        raise ValueError(f"{config.model_type}: scaled logits are not supported by the hf_transformers engine")


class HFCausalLM(nn.Module):
    """A transformers causal LM behind the engine's model interface (forward / forward_embeds / embed / logits)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.hf = model
        self.base = model.get_decoder() if hasattr(model, "get_decoder") else model.base_model
        self.args = HFArgs.from_config(model.config, model.get_input_embeddings().embedding_dim)
        self.kv_heads_per_rank = self.args.num_kv_heads

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.hf.get_input_embeddings()(input_ids)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Packed input_ids/positions [T] -> final hidden states [T, hidden] (inside `forward_context`)."""
        return self.forward_embeds(self.embed(input_ids), positions)

    def forward_embeds(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        out = self.base(inputs_embeds=x[None], position_ids=positions[None], use_cache=False)
        return out.last_hidden_state[0]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.hf.get_output_embeddings()(hidden).float()


def load_hf_model(folder: Path, dtype: torch.dtype, device: torch.device) -> HFCausalLM:
    """Load the model with transformers (offline, any weight format it reads) with paged attention."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise ValueError(f"Unsupported model type {config.model_type}")  # TGIS's words
    if not getattr(MODEL_FOR_CAUSAL_LM_MAPPING[type(config)], "_supports_attention_backend", False):
        raise ValueError(f"{config.model_type}: its attention does not go through transformers' attention "
                         "interface, so the hf_transformers engine cannot page its KV cache")
    _check_supported(config)
    register_attention()
    model = AutoModelForCausalLM.from_pretrained(folder, config=config, dtype=dtype, local_files_only=True,
                                                 attn_implementation=ATTENTION)
    return HFCausalLM(model.to(device).eval().requires_grad_(False))
