"""What a model folder and the worker's flags say before any weight is read: device, dtype, context length, EOS/pad ids."""

from __future__ import annotations

import os
from pathlib import Path

import torch

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
MAX_LENGTH_KEYS = (
    "max_position_embeddings", "n_positions", "max_seq_len", "seq_length",
    "max_sequence_length", "max_seq_length", "seq_len",
)
DEFAULT_MAX_SEQUENCE_LENGTH = 2048


def resolve_device(name: str, rank: int = 0) -> torch.device:
    """'auto' is this rank's local GPU when there is one, else the CPU."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", rank % torch.cuda.device_count()))
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """The weights dtype: `name` if given, else float16 on GPUs and float32 elsewhere."""
    if name is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"Unrecognized data type: {name}")
    return DTYPES[name]


def model_max_length(model_config: dict) -> int:
    """The context length a config.json declares (under one of its many names), else 2048."""
    for key in MAX_LENGTH_KEYS:
        if isinstance(model_config.get(key), int):
            return model_config[key]
    return DEFAULT_MAX_SEQUENCE_LENGTH


def _first(value: int | list[int] | None) -> int | None:
    return value[0] if isinstance(value, list) else value


def special_token_ids(model_config: dict, model_path: Path) -> tuple[int, int]:
    """(EOS id, pad id) from config.json, EOS from the tokenizer when the config has none; pad defaults to EOS."""
    eos_id = _first(model_config.get("eos_token_id"))
    if eos_id is None:
        eos_id = _tokenizer_eos(model_path)
    pad_id = _first(model_config.get("pad_token_id"))
    return eos_id, eos_id if pad_id is None else pad_id


def _tokenizer_eos(model_path: Path) -> int:
    from transformers import AutoTokenizer

    eos = AutoTokenizer.from_pretrained(model_path).eos_token_id
    if eos is None:
        raise ValueError(f"no eos_token_id in {model_path}/config.json nor in its tokenizer")
    return eos
