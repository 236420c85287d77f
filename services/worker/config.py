"""Configuration of one worker rank (flags and TGIS env vars)."""

from __future__ import annotations

from dataclasses import dataclass

from services.common.config import knob
from services.common.model_path import DEMO_MODEL

# Weight-only formats of `--quantize` (services/worker/quant.py); "none" or unset keeps the float weights.
QUANTIZE_METHODS = ("int8", "int4")


def quantize_method(value: str | None) -> str | None:
    """The `--quantize` value as a method name (None for none); anything else fails in TGIS's words."""
    if value is None or value.lower() in ("", "none"):
        return None
    if value.lower() not in QUANTIZE_METHODS:
        raise ValueError(f"{value} quantization not supported by tgis-pipeline (supported: none, int8, int4)")
    return value.lower()


def quantized_dtype(quantize: str | None) -> str | None:
    """The dtype the launcher gives quantizing workers when none is set: bfloat16, the dtype of the quantized
    matmuls, so the embedding, attention and KV cache run without float32 round trips."""
    return "bfloat16" if quantize_method(quantize) else None


@dataclass(frozen=True)
class WorkerConfig:
    model_name: str = knob(DEMO_MODEL, "MODEL_NAME", "hub model id (looked up in the local HF cache) or a local folder")
    revision: str | None = knob(None, "REVISION", "model revision in the HF cache")
    dtype_str: str | None = knob(None, "DTYPE_STR", "weights dtype: float32, float16, bfloat16 (default float32 on CPU, float16 on GPU)")
    max_sequence_length: int | None = knob(None, "MAX_SEQUENCE_LENGTH", "max input + output tokens (default: model config, else 2048)")
    max_new_tokens: int = knob(1024, "MAX_NEW_TOKENS", "max generated tokens per request (lowered to max_sequence_length - 1)")
    max_batch_size: int = knob(12, "MAX_BATCH_SIZE", "max sequences in the running batch (KV cache slots)")
    kv_cache_memory: str = knob("auto", "KV_CACHE_MEMORY", "KV block pool size, e.g. 4GiB (auto: 25%% of RAM on CPU, 90%% of free GPU memory after loading)")
    kv_block_size: int = knob(16, "KV_BLOCK_SIZE", "token positions per KV cache block")
    quantize: str | None = knob(None, "QUANTIZE", "weight-only quantization at load: none, int8 (per channel) or int4 (group-wise); matmuls in bfloat16")
    quantize_group_size: int = knob(32, "QUANTIZE_GROUP_SIZE", "int4: input columns per scale/zero pair (halved for a layer it does not divide)")
    pt2_compile: str | None = knob(None, "PT2_COMPILE", "torch.compile the forward pass: any value but false (start-up compiles for minutes)")
    float32_prepack: str = knob("auto", "FLOAT32_PREPACK", "CPU float32: prepack linear weights for oneDNN: auto (when it measures faster than torch's kernel at load), true, or false (matmuls bit-identical to transformers')")
    native_kernels: bool = knob(True, "NATIVE_KERNELS", "on CPU, build (once per machine, cached) and use the native decode-attention kernel; needs g++ or $CXX, else torch ops")
    deployment_framework: str | None = knob(None, "DEPLOYMENT_FRAMEWORK", "engine: tgis_native (our tensor-parallel families), hf_transformers or hf_accelerate (any transformers causal LM, one shard); unset: tgis_native when the model type has it, else hf_transformers")
    prefix_store_path: str | None = knob(None, "PREFIX_STORE_PATH", "folder of tuned prompt prefixes, one sub-folder per prefix_id (unset: prefixes off)")
    prompt_cache_size_mb: int = knob(512, "PROMPT_CACHE_SIZE_MB", "MiB of prompt prefixes kept loaded (least recently used dropped first)")
    max_prompt_prefix_length: int | None = knob(None, "MAX_PROMPT_PREFIX_LENGTH", "longest prompt prefix in virtual tokens (default: half of max_sequence_length)")
    adapter_cache: str | None = knob(None, "ADAPTER_CACHE", "folder of PEFT LoRA adapters, one sub-folder per adapter_id (the vLLM TGIS adapter's layout; unset: adapters off)")
    max_loras: int = knob(4, "MAX_LORAS", "LoRA adapters kept loaded per rank, and distinct adapters in the running batch (least recently used evicted first)")
    guided_decoding_cache_size: int = knob(256, "GUIDED_DECODING_CACHE_SIZE", "guided decoding: distinct constraints (schemas, regexes, grammars) kept compiled (least recently used dropped first)")
    device: str = knob("auto", "WORKER_DEVICE", "torch device: auto, cpu, cuda, cuda:N (auto: cuda:LOCAL_RANK if available)")
    rank: int = knob(0, "RANK", "this process's rank in the model replica")
    world_size: int = knob(1, "WORLD_SIZE", "ranks in the model replica (tensor parallel degree)")
    master_addr: str = knob("localhost", "MASTER_ADDR", "torch.distributed rendezvous host")
    master_port: int = knob(29500, "MASTER_PORT", "torch.distributed rendezvous port")
    step_endpoint: str = knob("tcp://127.0.0.1:5561", "WORKER_STEP_ENDPOINT", "scheduler's PUB socket for steps (connect)")
    result_endpoint: str = knob("tcp://127.0.0.1:5562", "WORKER_RESULT_ENDPOINT", "scheduler's ROUTER socket for results (connect)")
    heartbeat_interval: float = knob(1.0, "WORKER_HEARTBEAT_INTERVAL", "seconds between heartbeats to the scheduler")
    health_port: int = knob(0, "HEALTH_PORT", "HTTP port for /live and /ready probes (0: none)")
    health_stall_timeout: float = knob(600.0, "HEALTH_STALL_TIMEOUT_S", "seconds one step may run before /live fails (a rank stuck in a forward pass or collective)")
