"""Configuration of one tokenizer process (flags and env vars)."""

from __future__ import annotations

from dataclasses import dataclass

from services.common.config import knob
from services.common.model_path import DEMO_MODEL


@dataclass(frozen=True)
class TokenizerConfig:
    model_name: str = knob(DEMO_MODEL, "MODEL_NAME", "hub model id (looked up in the local HF cache) or a local folder")
    revision: str | None = knob(None, "REVISION", "model revision in the HF cache")
    gateway_endpoint: str = knob("tcp://127.0.0.1:5570", "TOKENIZER_ENDPOINT", "gateways' tokenizer-pool ROUTER sockets, comma-separated (connect to each; a host name stands for every address it resolves to)")
    name: str = knob("", "TOKENIZER_NAME", "name in logs and metrics (default: host-pid)")
    heartbeat_interval: float = knob(1.0, "TOKENIZER_HEARTBEAT_INTERVAL", "seconds between heartbeats to the gateway")
    health_port: int = knob(0, "HEALTH_PORT", "HTTP port for /live and /ready probes (0: none)")
    health_stall_timeout: float = knob(30.0, "HEALTH_STALL_TIMEOUT_S", "seconds without a turn of the socket loop before /live fails")
