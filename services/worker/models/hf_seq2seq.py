"""The `hf_transformers` engine's encoder-decoder model: any model `AutoModelForSeq2SeqLM` loads, on its own cache.

It has the interface of the native T5 (`encoder_decoder`, `embed`, `encode`,
`decode`, `logits`), so `seq2seq.py` runs it with TGIS's encoder-decoder rules
(decoder start token, prompt prefixes, NaN input details, penalties over
decoder ids) unchanged.  Unlike decoder-only models, an encoder-decoder's
attention cannot be routed to the paged KV cache: decoders such as BART's
compute their learned positions from the length of their own cache, so
tokens of several sequences cannot be packed into one row.  Each sequence
therefore keeps its encoder output and a transformers `EncoderDecoderCache`
(self-attention K/V of its decoder tokens, cross-attention K/V projected
once), and the decoder runs sequence by sequence: slower than the native T5,
but every architecture transformers implements works.  The step's logits
come from the model's own forward (heads differ: BART's `final_logits_bias`,
T5's output scaling), so `decode` returns logits and `logits` passes them on.
The engine's KV pool goes unused (`paged = False`); the scheduler still
admits by its blocks, which bound the decoder tokens held in these caches.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from services.worker.models.hf_transformers import HFArgs


@dataclass(frozen=True)
class Seq2SeqArgs(HFArgs):
    """HFArgs of the decoder (whose tokens the scheduler's blocks count) and the token it starts from."""

    decoder_start_token_id: int = 0

    @classmethod
    def from_model(cls, model: nn.Module) -> Seq2SeqArgs:
        config, generation = model.config, model.generation_config
        heads = getattr(config, "decoder_attention_heads", None) or config.num_attention_heads
        start = generation.decoder_start_token_id
        if start is None:
            start = config.decoder_start_token_id
        if start is None:  # TGIS: else the BOS token
            start = config.bos_token_id
        if start is None:
            raise ValueError(f"{config.model_type}: no decoder_start_token_id nor bos_token_id in the config")
        return cls(vocab_size=config.vocab_size, hidden_size=model.get_input_embeddings().embedding_dim,
                   num_layers=getattr(config, "decoder_layers", None) or getattr(config, "num_decoder_layers", None)
                   or config.num_hidden_layers,
                   num_heads=heads, num_kv_heads=heads,
                   head_dim=getattr(config, "d_kv", None) or config.hidden_size // heads,
                   decoder_start_token_id=int(start))


class SequenceState:
    """One sequence's encoder output [1, n, hidden] and transformers' cache of its decoder rows so far."""

    def __init__(self, encoder: torch.Tensor) -> None:
        self.encoder = encoder
        self.cache = None
        self.length = 0  # decoder positions in `cache`


class HFSeq2SeqLM(nn.Module):
    """A transformers encoder-decoder behind the engine's encoder-decoder interface (see `models/t5.py`)."""

    encoder_decoder = True
    paged = False  # the engine's paged KV pool is not used (allocated on the meta device)

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.hf = model
        self.args = Seq2SeqArgs.from_model(model)
        self.kv_heads_per_rank = self.args.num_kv_heads

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.hf.get_input_embeddings()(input_ids)

    def encode(self, x: torch.Tensor) -> SequenceState:
        """One sequence's encoder input embeddings [n, hidden] -> its state (the encoder output, no cache yet)."""
        return SequenceState(self.hf.get_encoder()(inputs_embeds=x[None]).last_hidden_state)

    def decode(self, x: torch.Tensor, positions: torch.Tensor,
               segments: list[tuple[int, int, SequenceState]]) -> torch.Tensor:
        """Decoder input embeddings [T, hidden] of the sequences' rows (start, count) at decoder `positions` ->
        logits [T, vocab], each sequence through its own cache (a chunk from position 0 starts a new one)."""
        from transformers import DynamicCache, EncoderDecoderCache
        from transformers.modeling_outputs import BaseModelOutput

        out = x.new_empty(x.shape[0], self.args.vocab_size, dtype=torch.float32)
        firsts = positions.tolist()
        for start, count, state in segments:
            if firsts[start] == 0:  # a new sequence, or one recomputed after preemption
                state.cache, state.length = EncoderDecoderCache(DynamicCache(), DynamicCache()), 0
            if firsts[start] != state.length:
                raise RuntimeError(f"decoder rows from position {firsts[start]}, but {state.length} are cached")
            result = self.hf(encoder_outputs=BaseModelOutput(last_hidden_state=state.encoder),
                             decoder_inputs_embeds=x[start: start + count][None], cache=state.cache, use_cache=True)
            out[start: start + count] = result.logits[0].float()
            state.length += count
        return out

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden  # `decode` returned the model's own logits


def load_hf_seq2seq(folder: Path, dtype: torch.dtype, device: torch.device) -> HFSeq2SeqLM:
    """Load an encoder-decoder with transformers (offline, any weight format it reads)."""
    from transformers import AutoConfig, AutoModelForSeq2SeqLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING

    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    if type(config) not in MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING:
        raise ValueError(f"Unsupported model type {config.model_type}")  # TGIS's words
    model = AutoModelForSeq2SeqLM.from_pretrained(folder, config=config, dtype=dtype, local_files_only=True)
    # One `embed` serves encoder input and decoder tokens (and prompt prefixes): both must use the same table.
    shared = model.get_input_embeddings()
    for part in (model.get_encoder(), model.get_decoder()):
        table = part.get_input_embeddings()
        if table.weight.data_ptr() != shared.weight.data_ptr() or \
                getattr(table, "embed_scale", 1.0) != getattr(shared, "embed_scale", 1.0):
            raise ValueError(f"{config.model_type}: encoder and decoder embeddings differ, which the "
                             "hf_transformers engine does not support")
    return HFSeq2SeqLM(model.to(device).eval().requires_grad_(False))
