"""Configuration of the gateway (flags and TGIS env vars)."""

from __future__ import annotations

from dataclasses import dataclass

from services.common.config import knob


@dataclass(frozen=True)
class GatewayConfig:
    grpc_port: int = knob(8033, "GRPC_PORT", "gRPC port", short="-g")
    port: int = knob(3000, "PORT", "HTTP port for /health and /metrics", short="-p")
    host: str = knob("0.0.0.0", "GATEWAY_HOST", "address the gRPC and HTTP servers listen on")
    max_concurrent_requests: int = knob(512, "MAX_CONCURRENT_REQUESTS", "inputs in flight before 'Model is overloaded'")
    default_include_stop_seqs: bool = knob(True, "DEFAULT_INCLUDE_STOP_SEQS", "include the matched stop sequence in the text when the request doesn't say")
    output_special_tokens: bool = knob(False, "OUTPUT_SPECIAL_TOKENS", "keep special tokens in generated text")
    tls_cert_path: str | None = knob(None, "TLS_CERT_PATH", "server certificate (PEM) for gRPC TLS")
    tls_key_path: str | None = knob(None, "TLS_KEY_PATH", "server private key (PEM) for gRPC TLS")
    tls_client_ca_cert_path: str | None = knob(None, "TLS_CLIENT_CA_CERT_PATH", "CA (PEM) that client certificates must be signed by (mTLS)")
    scheduler_endpoint: str = knob("tcp://127.0.0.1:5550", "SCHEDULER_ENDPOINT", "the schedulers of the model replicas, comma-separated (connect to each; a host name stands for every address it resolves to)")
    tokenizer_endpoint: str = knob("tcp://127.0.0.1:5570", "TOKENIZER_ENDPOINT", "ROUTER socket the tokenizer pool joins (bind)")
    tokenizer_heartbeat_timeout: float = knob(3.0, "TOKENIZER_HEARTBEAT_TIMEOUT_S", "seconds without a heartbeat before a tokenizer is dropped from the pool")
    tokenizer_wait_timeout: float = knob(30.0, "TOKENIZER_WAIT_TIMEOUT_S", "seconds a request waits for a tokenizer to join an empty pool")
    drain_grace_period: float = knob(30.0, "DRAIN_GRACE_PERIOD_S", "on SIGTERM, seconds in-flight requests get to finish")
    max_message_bytes: int = knob(4 * 1024 * 1024, "GRPC_MAX_MESSAGE_BYTES", "largest gRPC request accepted")
    prefix_store_path: str | None = knob(None, "PREFIX_STORE_PATH", "folder of tuned prompt prefixes, one sub-folder per prefix_id (unset: prefixes off)")
    prompt_cache_size_mb: int = knob(512, "PROMPT_CACHE_SIZE_MB", "MiB of prompt prefixes kept loaded for validation (least recently used dropped first)")
    max_prompt_prefix_length: int | None = knob(None, "MAX_PROMPT_PREFIX_LENGTH", "longest prompt prefix in virtual tokens (default: half of max_sequence_length)")
    adapter_cache: str | None = knob(None, "ADAPTER_CACHE", "folder of PEFT LoRA adapters, one sub-folder per adapter_id, checked before queueing (the workers' folder; unset: adapter_id refused)")
    health_timeout: float = knob(60.0, "HEALTH_TIMEOUT_S", "seconds the /health pipeline generation may take")
