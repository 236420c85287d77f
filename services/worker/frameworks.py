"""DEPLOYMENT_FRAMEWORK: which engine serves the model, as TGIS selects it, with the reason logged.

`tgis_native` is our own tensor-parallel implementation of the families in
the model registry (safetensors required); `hf_transformers` (alias
`hf_accelerate`) runs any causal LM transformers loads, on the same paged
cache, on one shard.  Unset, the choice is `tgis_native` when the model type
has an implementation and safetensors weights exist, else `hf_transformers`.
TGIS's forced switches hold: `hf_custom_tp` is `tgis_native` (deprecated),
and `hf_transformers` with several shards becomes `tgis_native`.
"""

from __future__ import annotations

from services.worker.models.registry import supported

NATIVE, HF = "tgis_native", "hf_transformers"
CHOICES = (NATIVE, HF, "hf_accelerate", "hf_custom_tp")
NOT_AVAILABLE = ("hf_optimum_bt", "hf_optimum_ort", "ds_inference", "ibm_fms")


def check_framework_name(name: str | None) -> None:
    """ValueError for a DEPLOYMENT_FRAMEWORK this pipeline does not have (unset means: choose by model type)."""
    if not name or name in CHOICES:
        return
    if name in NOT_AVAILABLE:
        raise ValueError(f"deployment framework {name} is not available in tgis-pipeline "
                         f"(available: {', '.join(CHOICES)})")
    raise ValueError(f"unknown deployment framework {name} (available: {', '.join(CHOICES)})")


def choose_framework(requested: str | None, model_type: str | None, has_safetensors: bool,
                     world_size: int) -> tuple[str, str]:
    """The engine to use and why (for the log line); ValueError when no engine can serve this combination."""
    check_framework_name(requested)
    if requested == "hf_custom_tp":
        return NATIVE, "hf_custom_tp is deprecated: it is tgis_native"
    if requested in (HF, "hf_accelerate"):
        if world_size > 1:
            return NATIVE, f"{requested} with {world_size} shards switches to tgis_native (tensor parallel), as TGIS does"
        return HF, f"DEPLOYMENT_FRAMEWORK={requested}"
    if requested == NATIVE:
        return NATIVE, "DEPLOYMENT_FRAMEWORK=tgis_native"
    if supported(model_type) and has_safetensors:
        return NATIVE, f"model type {model_type} has a tgis_native implementation"
    why = ("no safetensors weights (tgis_native needs them)" if supported(model_type)
           else f"model type {model_type} has no tgis_native implementation")
    if world_size > 1:
        raise ValueError(f"{why}, and hf_transformers runs on one shard: cannot serve it with {world_size} shards")
    return HF, why
