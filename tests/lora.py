"""LoRA adapters made with PEFT for tests, and PEFT's own greedy generation with them (the independent reference)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def make_adapter(model_path: Path, folder: Path, *, seed: int, targets: tuple[str, ...] = ALL_TARGETS, r: int = 8,
                 alpha: int = 16, safetensors: bool = True, **options) -> Path:
    """save_pretrained a LoRA adapter of `model_path` with random non-zero A and B (PEFT's default B is zero, which
    would make the adapter a no-op), and B scaled up so it changes greedy choices."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=False, **options)
    model = get_peft_model(base, config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.mul_(4.0)
    model.save_pretrained(folder, safe_serialization=safetensors)  # False: adapter_model.bin
    return folder


def peft_greedy(model_path: Path, adapter: Path | None, ids: list[int], max_new_tokens: int) -> list[int]:
    """PEFT's generate() with the adapter (plain transformers without one): greedy, all max_new_tokens tokens."""
    from peft import PeftModel

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)  # fresh: PEFT edits it
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see reference.greedy: the servers under test share the cores
    try:
        with torch.no_grad():
            out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 do_sample=False, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                                 pad_token_id=0, num_beams=1, temperature=None, top_p=None, top_k=None)
    finally:
        torch.set_num_threads(threads)
    return out[0, len(ids):].tolist()
