"""`text-generation-launcher`: start and supervise the whole pipeline on one machine.

Takes TGIS's launcher flags and env vars, starts `--num-replicas` model
replicas (1 scheduler + the worker ranks each), the tokenizer pool and
`--num-gateways` gateways (gRPC and HTTP ports counted up from --grpc-port and
--port), wired over ipc sockets in a private folder or over loopback tcp ports
(`--internal-transport tcp`).  Every tokenizer serves every gateway; every
gateway routes over every replica.  A dying tokenizer is replaced (the
gateways move its work to the others); any other child dying stops everything
with a non-zero exit naming it.  SIGTERM/SIGINT stop the gateways first (they
drain), then the rest; exit 0.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from services.common import links
from services.common.config import knob
from services.common.logs import setup_logging
from services.common.model_path import DEMO_MODEL
from services.gateway.tls import tls_files_error
from services.launcher_wiring import Wiring, suffix
from services.scheduler.admission import check_settings
from services.worker.config import quantize_method, quantized_dtype
from services.worker.frameworks import check_framework_name

log = logging.getLogger("launcher")

# TGIS launcher knobs that this pipeline accepts but does not act on (yet).
ACCEPTED_NOT_USED = ("max_prefill_padding", "shard_uds_path",
                     "otlp_endpoint", "otlp_service_name", "cuda_process_memory_fraction")


@dataclass(frozen=True)
class LauncherConfig:
    model_name: str = knob(DEMO_MODEL, "MODEL_NAME", "hub model id (in the local HF cache) or a local folder")
    revision: str | None = knob(None, "REVISION", "model revision")
    deployment_framework: str | None = knob(None, "DEPLOYMENT_FRAMEWORK", "engine: tgis_native, hf_transformers or hf_accelerate (unset: tgis_native when the model type has it, else hf_transformers; README: supported models)")
    dtype: str | None = knob(None, "DTYPE", "weights dtype")
    dtype_str: str | None = knob(None, "DTYPE_STR", "weights dtype (TGIS's other name for --dtype)")
    quantize: str | None = knob(None, "QUANTIZE", "weight-only quantization at load: none, int8 or int4 (matmuls in bfloat16)")
    quantize_group_size: int = knob(32, "QUANTIZE_GROUP_SIZE", "int4: input columns per scale/zero pair")
    prefix_store_path: str | None = knob(None, "PREFIX_STORE_PATH", "folder of tuned prompt prefixes, one sub-folder per prefix_id (unset: prefixes off)")
    prompt_cache_size_mb: int = knob(512, "PROMPT_CACHE_SIZE_MB", "MiB of prompt prefixes kept loaded, per gateway and per worker rank")
    max_prompt_prefix_length: int | None = knob(None, "MAX_PROMPT_PREFIX_LENGTH", "longest prompt prefix in virtual tokens (default: half of max_sequence_length)")
    adapter_cache: str | None = knob(None, "ADAPTER_CACHE", "folder of PEFT LoRA adapters, one sub-folder per adapter_id (the vLLM TGIS adapter's layout; unset: adapters off)")
    max_loras: int = knob(4, "MAX_LORAS", "LoRA adapters kept loaded per worker rank, and distinct adapters in the running batch")
    pt2_compile: str | None = knob(None, "PT2_COMPILE", "torch.compile the workers' forward pass: any value but false (start-up compiles for minutes)")
    guided_decoding_cache_size: int = knob(256, "GUIDED_DECODING_CACHE_SIZE", "guided decoding: distinct constraints (schemas, regexes, grammars) kept compiled per worker rank")
    float32_prepack: str = knob("auto", "FLOAT32_PREPACK", "CPU float32: prepack linear weights for oneDNN: auto (when faster than torch's kernel, measured at load), true, or false (matmuls bit-identical to transformers')")
    native_kernels: bool = knob(True, "NATIVE_KERNELS", "CPU workers build and use the native decode-attention kernel (needs g++ or $CXX; without one they keep torch ops)")
    num_shard: int | None = knob(None, "NUM_SHARD", "worker ranks (tensor parallel degree)")
    max_concurrent_requests: int = knob(512, "MAX_CONCURRENT_REQUESTS", "inputs in flight before 'Model is overloaded'")
    max_sequence_length: int | None = knob(None, "MAX_SEQUENCE_LENGTH", "max input + output tokens (default: model config, else 2048)")
    max_new_tokens: int = knob(1024, "MAX_NEW_TOKENS", "max generated tokens per request")
    max_batch_size: int = knob(12, "MAX_BATCH_SIZE", "max sequences in the running batch")
    max_prefill_padding: float = knob(0.2, "MAX_PREFILL_PADDING", "TGIS padding limit (batches here are unpadded)")
    batch_safety_margin: int = knob(20, "BATCH_SAFETY_MARGIN", "percent of the admission weight limit kept free")
    kv_cache_memory: str = knob("auto", "KV_CACHE_MEMORY", "KV block pool size per rank, e.g. 4GiB (auto: 25%% of RAM on CPU, 90%% of free GPU memory)")
    kv_block_size: int = knob(16, "KV_BLOCK_SIZE", "token positions per KV cache block")
    prefix_caching: bool = knob(True, "PREFIX_CACHING", "reuse cached KV blocks of common prompt prefixes")
    max_prefill_tokens: int = knob(512, "MAX_PREFILL_TOKENS", "prompt tokens computed per step (chunked prefill budget)")
    max_prefill_tokens_while_decoding: int = knob(64, "MAX_PREFILL_TOKENS_WHILE_DECODING", "prompt chunk per step while other sequences decode (bounds their inter-token latency; raise on GPUs)")
    estimate_memory: str = knob("auto", "ESTIMATE_MEMORY", "admission weight model: auto (from the KV block pool), manual or off")
    max_waiting_tokens: int = knob(24, "MAX_WAITING_TOKENS", "decode steps before waiting requests join anyway")
    port: int = knob(3000, "PORT", "HTTP /health and /metrics port", short="-p")
    grpc_port: int = knob(8033, "GRPC_PORT", "gRPC port", short="-g")
    shard_uds_path: str = knob("/tmp/text-generation-server", "SHARD_UDS_PATH", "TGIS shard socket path (sockets live in --ipc-dir here)")
    master_addr: str = knob("localhost", "MASTER_ADDR", "torch.distributed rendezvous host")
    master_port: int = knob(29500, "MASTER_PORT", "torch.distributed rendezvous port")
    json_output: bool = knob(False, "JSON_OUTPUT", "log JSON lines")
    tls_cert_path: str | None = knob(None, "TLS_CERT_PATH", "gRPC TLS certificate")
    tls_key_path: str | None = knob(None, "TLS_KEY_PATH", "gRPC TLS key")
    tls_client_ca_cert_path: str | None = knob(None, "TLS_CLIENT_CA_CERT_PATH", "CA for client certificates (mTLS)")
    output_special_tokens: bool = knob(False, "OUTPUT_SPECIAL_TOKENS", "keep special tokens in generated text")
    cuda_process_memory_fraction: float = knob(1.0, "CUDA_PROCESS_MEMORY_FRACTION", "share of GPU memory to use", short="-c")
    default_include_stop_seqs: bool = knob(True, "DEFAULT_INCLUDE_STOP_SEQS", "include matched stop sequences by default")
    otlp_endpoint: str | None = knob(None, "OTLP_ENDPOINT", "OpenTelemetry endpoint (not supported yet)")
    otlp_service_name: str | None = knob(None, "OTLP_SERVICE_NAME", "OpenTelemetry service name")
    num_tokenizers: int = knob(2, "NUM_TOKENIZERS", "tokenizer processes in the pool")
    num_gateways: int = knob(1, "NUM_GATEWAYS", "gateway processes (gRPC on --grpc-port + i, HTTP on --port + i)")
    num_replicas: int = knob(1, "NUM_REPLICAS", "model replicas: one scheduler and --num-shard worker ranks each")
    internal_transport: str = knob("ipc", "INTERNAL_TRANSPORT", "links between the services: ipc (sockets in --ipc-dir) or tcp (loopback ports)")
    ipc_dir: str | None = knob(None, "IPC_DIR", "folder for the pipeline's ipc sockets (default: a new temp folder)")
    drain_grace_period: float = knob(30.0, "DRAIN_GRACE_PERIOD_S", "on SIGTERM, seconds in-flight requests get")


def resolve_num_shard(config: LauncherConfig, environ: dict[str, str]) -> int:
    """TGIS's shard count rules: NUM_GPUS vs --num-shard, else visible devices, else 1."""
    num_gpus = environ.get("NUM_GPUS")
    if num_gpus is not None:
        try:
            num_gpus_value = int(num_gpus)
        except ValueError:
            raise SystemExit("NUM_GPUS must be a positive integer") from None
        if config.num_shard is not None and config.num_shard != num_gpus_value:
            raise SystemExit(f"NUM_GPUS and num_shard are set to different values ({num_gpus_value} and {config.num_shard})")
        shards = num_gpus_value
    elif config.num_shard is not None:
        shards = config.num_shard
    else:
        devices = environ.get("CUDA_VISIBLE_DEVICES") or environ.get("NVIDIA_VISIBLE_DEVICES") or ""
        shards = len([d for d in devices.split(",") if d.strip()]) or 1
    if shards < 1:
        raise SystemExit("num_shard must be at least 1")
    return shards


def check_config(config: LauncherConfig) -> None:
    """Refuse contradictory settings at start-up, with TGIS's messages; warn about unused ones."""
    if config.dtype and config.dtype_str and config.dtype != config.dtype_str:
        raise SystemExit("dtype and dtype_str args both provided with different values")
    if not 0 < config.cuda_process_memory_fraction <= 1:
        raise SystemExit("cuda_process_memory_fraction must be in range 0 < x <= 1")
    if config.max_concurrent_requests <= 0:
        raise SystemExit("max_concurrent_requests must be > 0")
    for name in ("num_tokenizers", "num_gateways", "num_replicas"):
        if getattr(config, name) <= 0:
            raise SystemExit(f"{name} must be > 0")
    if config.internal_transport not in ("ipc", "tcp"):
        raise SystemExit(f"internal_transport must be ipc or tcp, got {config.internal_transport!r}")
    try:
        check_settings(config.estimate_memory, config.batch_safety_margin)
        quantize_method(config.quantize)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    # Before any model loads: a bad certificate or key must not cost a model load to find out.
    tls_problem = tls_files_error(config.tls_cert_path, config.tls_key_path, config.tls_client_ca_cert_path)
    if tls_problem:
        raise SystemExit(tls_problem)
    defaults = {f.name: f.default for f in dataclasses.fields(LauncherConfig)}
    for name in ACCEPTED_NOT_USED:
        if getattr(config, name) != defaults[name]:
            log.warning("--%s is set to %s but this pipeline does not use it yet; ignoring it",
                        name.replace("_", "-"), getattr(config, name))
    try:
        check_framework_name(config.deployment_framework)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    for name in ("MAX_BATCH_WEIGHT", "MAX_PREFILL_WEIGHT"):
        if os.environ.get(name):
            log.warning("%s is set to %s but this parameter will be ignored.", name, os.environ[name])


@dataclass
class Child:
    name: str
    argv: list[str]
    env: dict[str, str]
    process: subprocess.Popen | None = None
    restarts: int = field(default=0)

    def start(self) -> None:
        self.process = subprocess.Popen(self.argv, env=self.env)
        log.info("started %s (pid %d)", self.name, self.process.pid)


class Launcher:
    """Starts the children, watches them, and stops them in order."""

    def __init__(self, config: LauncherConfig, environ: dict[str, str]) -> None:
        self.config = config
        self.num_shard = resolve_num_shard(config, environ)
        self.own_ipc_dir = config.ipc_dir is None  # a temp folder of ours is removed at the end
        self.ipc_dir = Path(config.ipc_dir or tempfile.mkdtemp(prefix="tgis-pipeline-"))
        self.ipc_dir.mkdir(parents=True, exist_ok=True)
        self.wiring = Wiring(config.internal_transport, self.ipc_dir, config.num_gateways, config.num_replicas,
                             config.grpc_port, config.port, config.master_port)
        self.env = self._child_env(environ)
        self.children: list[Child] = []
        self.stopping = False
        self._tokenizer_ids = 0

    def _child_env(self, environ: dict[str, str]) -> dict[str, str]:
        c = self.config
        env = dict(environ)
        settings = {
            "MODEL_NAME": c.model_name, "REVISION": c.revision, "DTYPE_STR": c.dtype_str or c.dtype or quantized_dtype(c.quantize),
            "QUANTIZE": c.quantize, "QUANTIZE_GROUP_SIZE": c.quantize_group_size,
            "DEPLOYMENT_FRAMEWORK": c.deployment_framework, "PREFIX_STORE_PATH": c.prefix_store_path,
            "PROMPT_CACHE_SIZE_MB": c.prompt_cache_size_mb, "MAX_PROMPT_PREFIX_LENGTH": c.max_prompt_prefix_length,
            "ADAPTER_CACHE": c.adapter_cache, "MAX_LORAS": c.max_loras,
            "PT2_COMPILE": c.pt2_compile, "NATIVE_KERNELS": c.native_kernels, "FLOAT32_PREPACK": c.float32_prepack, "GUIDED_DECODING_CACHE_SIZE": c.guided_decoding_cache_size,
            "MAX_SEQUENCE_LENGTH": c.max_sequence_length, "MAX_NEW_TOKENS": c.max_new_tokens,
            "MAX_BATCH_SIZE": c.max_batch_size, "MAX_WAITING_TOKENS": c.max_waiting_tokens,
            "KV_CACHE_MEMORY": c.kv_cache_memory, "KV_BLOCK_SIZE": c.kv_block_size,
            "PREFIX_CACHING": c.prefix_caching, "MAX_PREFILL_TOKENS": c.max_prefill_tokens,
            "MAX_PREFILL_TOKENS_WHILE_DECODING": c.max_prefill_tokens_while_decoding,
            "ESTIMATE_MEMORY": c.estimate_memory, "BATCH_SAFETY_MARGIN": c.batch_safety_margin,
            "MAX_CONCURRENT_REQUESTS": c.max_concurrent_requests, "PORT": c.port, "GRPC_PORT": c.grpc_port,
            "TLS_CERT_PATH": c.tls_cert_path, "TLS_KEY_PATH": c.tls_key_path,
            "TLS_CLIENT_CA_CERT_PATH": c.tls_client_ca_cert_path,
            "OUTPUT_SPECIAL_TOKENS": c.output_special_tokens, "DEFAULT_INCLUDE_STOP_SEQS": c.default_include_stop_seqs,
            "JSON_OUTPUT": c.json_output, "NUM_SHARD": self.num_shard, "WORLD_SIZE": self.num_shard,
            "MASTER_ADDR": c.master_addr, "MASTER_PORT": c.master_port,
            "DRAIN_GRACE_PERIOD_S": c.drain_grace_period,
            "TOKENIZER_ENDPOINT": self.wiring.tokenizer_env(),
            **links.as_env(links.settings()),
            "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
            # One port per container in Kubernetes; here every child would try to bind the same one.
            "HEALTH_PORT": None,
        }
        for key, value in settings.items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = str(value).lower() if isinstance(value, bool) else str(value)
        return env

    def _module(self, module: str) -> list[str]:
        return [sys.executable, "-m", module]

    def _tokenizer(self) -> Child:
        self._tokenizer_ids += 1
        name = f"tokenizer-{self._tokenizer_ids}"
        return Child(name, self._module("services.tokenizer.main"), {**self.env, "TOKENIZER_NAME": name})

    def start(self) -> None:
        replicas = self.config.num_replicas
        # Ranks sharing this machine's CPU split its cores instead of each taking them all.
        threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // (self.num_shard * replicas)))
        for r in range(replicas):
            prefix = "" if r == 0 else f"replica-{r}-"
            replica_env = {**self.env, **self.wiring.replica_env(r)}
            self.children.append(Child(f"{prefix}scheduler", self._module("services.scheduler.main"), replica_env))
            for rank in range(self.num_shard):
                env = {**replica_env, "RANK": str(rank), "LOCAL_RANK": str(rank), "LOCAL_SIZE": str(self.num_shard),
                       "OMP_NUM_THREADS": threads}
                self.children.append(Child(f"{prefix}worker-{rank}", self._module("services.worker.main"), env))
        self.children.extend(self._tokenizer() for _ in range(self.config.num_tokenizers))
        for g in range(self.config.num_gateways):
            self.children.append(Child(f"gateway{suffix(g)}", self._module("services.gateway.main"),
                                       {**self.env, **self.wiring.gateway_env(g)}))
        for child in self.children:
            child.start()

    def watch(self) -> int:
        """Supervise until a stop signal (exit 0) or a non-tokenizer child dies (exit 1)."""
        while not self.stopping:
            time.sleep(0.2)
            for child in list(self.children):
                code = child.process.poll()
                if code is None or self.stopping:
                    continue
                if child.name.startswith("tokenizer-"):
                    log.error("%s exited with code %d; starting a replacement (the gateway moves its work)",
                              child.name, code)
                    self.children.remove(child)
                    replacement = self._tokenizer()
                    replacement.start()
                    self.children.append(replacement)
                    continue
                log.error("%s exited unexpectedly with code %d; stopping the pipeline", child.name, code)
                self.stop()
                return 1
        self.stop()
        return 0

    def stop(self) -> None:
        """Gateway first (it drains), then the rest; kill whatever is left after the grace period."""
        self.stopping = True
        order = sorted(self.children, key=lambda c: not c.name.startswith("gateway"))
        gateway_grace = self.config.drain_grace_period + 5
        for child in order:  # the gateways drain together, then the rest stops
            if child.process.poll() is None and child.name.startswith("gateway"):
                child.process.send_signal(signal.SIGTERM)
        for child in order:
            if child.name.startswith("gateway"):
                self._wait(child, gateway_grace)
            elif child.process.poll() is None:
                child.process.send_signal(signal.SIGTERM)
        for child in order:
            self._wait(child, 8)
        if self.own_ipc_dir:
            shutil.rmtree(self.ipc_dir, ignore_errors=True)

    @staticmethod
    def _wait(child: Child, timeout: float) -> None:
        try:
            child.process.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop in %.0f s; killing it", child.name, timeout)
            child.process.kill()
            child.process.wait()


def main(argv: list[str] | None = None) -> int:
    setup_logging("launcher")
    config = links.parse_with_links(LauncherConfig, argv, "Start the whole TGIS-compatible pipeline on this machine.")
    check_config(config)
    from services.common.model_path import ModelNotFoundError, resolve_model_path

    try:
        model_path = resolve_model_path(config.model_name, config.revision)
    except ModelNotFoundError as exc:
        log.error("%s (run `text-generation-server install-demo-model` for the demo model, or "
                  "`text-generation-server download-weights %s`)", exc, config.model_name)
        return 1
    launcher = Launcher(config, dict(os.environ))
    log.info("model %s at %s; %d replica(s) of %d worker rank(s), %d tokenizer(s), %d gateway(s); %s links%s",
             config.model_name, model_path, config.num_replicas, launcher.num_shard, config.num_tokenizers,
             config.num_gateways, config.internal_transport,
             f" (sockets in {launcher.ipc_dir})" if config.internal_transport == "ipc" else "")

    def request_stop(signum, _frame) -> None:
        if not launcher.stopping:
            log.info("received signal %d: stopping the pipeline", signum)
        launcher.stopping = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    launcher.start()
    code = launcher.watch()
    log.info("pipeline stopped (exit %d)", code)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
