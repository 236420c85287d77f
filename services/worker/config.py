"""Configuration of one worker rank (flags and TGIS env vars)."""

from __future__ import annotations

from dataclasses import dataclass

from services.common.config import knob
from services.common.model_path import DEMO_MODEL


@dataclass(frozen=True)
class WorkerConfig:
    model_name: str = knob(DEMO_MODEL, "MODEL_NAME", "hub model id (looked up in the local HF cache) or a local folder")
    revision: str | None = knob(None, "REVISION", "model revision in the HF cache")
    dtype_str: str | None = knob(None, "DTYPE_STR", "weights dtype: float32, float16, bfloat16 (default float32 on CPU, float16 on GPU)")
    max_sequence_length: int | None = knob(None, "MAX_SEQUENCE_LENGTH", "max input + output tokens (default: model config, else 2048)")
    max_new_tokens: int = knob(1024, "MAX_NEW_TOKENS", "max generated tokens per request (lowered to max_sequence_length - 1)")
    max_batch_size: int = knob(12, "MAX_BATCH_SIZE", "max sequences in the running batch (KV cache slots)")
    max_prefill_tokens: int = knob(4096, "MAX_PREFILL_TOKENS", "prompt tokens per prefill forward pass (a longer prompt runs alone)")
    device: str = knob("auto", "WORKER_DEVICE", "torch device: auto, cpu, cuda, cuda:N (auto: cuda:LOCAL_RANK if available)")
    rank: int = knob(0, "RANK", "this process's rank in the model replica")
    world_size: int = knob(1, "WORLD_SIZE", "ranks in the model replica (tensor parallel degree)")
    master_addr: str = knob("localhost", "MASTER_ADDR", "torch.distributed rendezvous host")
    master_port: int = knob(29500, "MASTER_PORT", "torch.distributed rendezvous port")
    step_endpoint: str = knob("tcp://127.0.0.1:5561", "WORKER_STEP_ENDPOINT", "scheduler's PUB socket for steps (connect)")
    result_endpoint: str = knob("tcp://127.0.0.1:5562", "WORKER_RESULT_ENDPOINT", "scheduler's ROUTER socket for results (connect)")
    heartbeat_interval: float = knob(1.0, "WORKER_HEARTBEAT_INTERVAL", "seconds between heartbeats to the scheduler")
