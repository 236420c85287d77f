"""The model registry: which `tgis_native` implementation serves a config.json's `model_type`.

Every decoder family is a short module (`models/<family>.py`) with the same
three names: `MODEL_TYPES`, `decoder_args(config) -> DecoderArgs` (the
traits `layers.py` builds from) and `modules(args)` (our module path ->
the checkpoint's, per layer with `{i}`); optionally `TRANSPOSED_TYPES`, the
model types storing projections as [in, out].  Encoder-decoder types (T5)
have a model class and loader of their own (`models/t5.py`,
`checkpoint._load_t5`).  Families are imported only when used.
"""

from __future__ import annotations

import importlib
from types import ModuleType

# model_type -> family module; kept literal (not imported) so the gateway and launcher can ask cheaply.
MODEL_TYPES = {
    "llama": "llama", "mistral": "llama", "qwen2": "llama",
    "gpt_neox": "gpt_neox",
    "gpt2": "gpt2", "gpt_bigcode": "gpt2",
    "falcon": "falcon", "RefinedWeb": "falcon", "RefinedWebModel": "falcon",
    "bloom": "bloom",
    "mpt": "mpt",
    "t5": "t5", "mt5": "t5",
}
# Encoder-decoder types: their module has its own model class and loader (`checkpoint._load_t5`).
ENCODER_DECODER_TYPES = ("t5", "mt5")


def supported(model_type: str | None) -> bool:
    """Whether `tgis_native` has an implementation of this model type."""
    return model_type in MODEL_TYPES


def family(model_type: str | None) -> ModuleType:
    """The family module implementing `model_type`; ValueError naming the supported types otherwise."""
    if model_type not in MODEL_TYPES:
        raise ValueError(f"unsupported model_type {model_type!r} for the tgis_native engine "
                         f"(supported: {', '.join(sorted(MODEL_TYPES))})")
    return importlib.import_module(f"services.worker.models.{MODEL_TYPES[model_type]}")
