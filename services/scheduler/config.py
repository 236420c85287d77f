"""Configuration of the scheduler (flags and TGIS env vars)."""

from __future__ import annotations

from dataclasses import dataclass

from services.common.config import knob
from services.scheduler.admission import check_settings


@dataclass(frozen=True)
class SchedulerConfig:
    max_batch_size: int = knob(12, "MAX_BATCH_SIZE", "max sequences in the running batch")
    max_waiting_tokens: int = knob(24, "MAX_WAITING_TOKENS", "decode steps after which waiting requests join the batch even if few")
    estimate_memory: str = knob("auto", "ESTIMATE_MEMORY", "admission weight model: auto (from the KV block pool), manual or off")
    batch_safety_margin: int = knob(20, "BATCH_SAFETY_MARGIN", "percent of the admission weight limit kept free")
    max_prefill_tokens: int = knob(512, "MAX_PREFILL_TOKENS", "prompt tokens computed per step (chunked prefill budget; decodes ride along)")
    max_prefill_tokens_while_decoding: int = knob(64, "MAX_PREFILL_TOKENS_WHILE_DECODING", "prompt chunk per step while other sequences decode (bounds their inter-token latency; raise on GPUs)")
    prefix_caching: bool = knob(True, "PREFIX_CACHING", "reuse the KV blocks of earlier prompts' common prefixes")
    num_shard: int = knob(1, "NUM_SHARD", "worker ranks in the model replica (all must be ready)")
    gateway_endpoint: str = knob("tcp://127.0.0.1:5550", "SCHEDULER_ENDPOINT", "ROUTER socket for gateways (bind)")
    step_endpoint: str = knob("tcp://127.0.0.1:5561", "WORKER_STEP_ENDPOINT", "PUB socket for steps to worker ranks (bind)")
    result_endpoint: str = knob("tcp://127.0.0.1:5562", "WORKER_RESULT_ENDPOINT", "ROUTER socket for worker results (bind)")
    worker_timeout: float = knob(30.0, "WORKER_TIMEOUT_S", "seconds without a heartbeat after which a worker rank is declared lost")
    step_timeout: float = knob(120.0, "STEP_TIMEOUT_S", "seconds a step may go without a result before the worker group is declared lost")
    health_port: int = knob(0, "HEALTH_PORT", "HTTP port for /live and /ready probes (0: none)")
    health_stall_timeout: float = knob(30.0, "HEALTH_STALL_TIMEOUT_S", "seconds without a turn of the scheduling loop before /live fails")

    def __post_init__(self) -> None:
        check_settings(self.estimate_memory, self.batch_safety_margin)  # at start-up, not when the workers are ready
