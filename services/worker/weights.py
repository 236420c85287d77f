"""Model weights tooling: downloads from the HF hub and .bin → safetensors conversion."""

from __future__ import annotations

import json
import logging
import os
import socket
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit
from urllib.request import getproxies, proxy_bypass

from services.common.model_path import hub_cache_dir, resolve_model_path

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

META_EXTENSIONS = (".json", ".py", ".model", ".md")
HUB_SKIP_WORDS = ("arguments", "args", "training")
CONVERT_SKIP_WORDS = (*HUB_SKIP_WORDS, "optimizer", "scheduler", "index")
DOWNLOAD_THREADS = 5
HUB_PROBE_TIMEOUT_S = 5.0
_TRUE_VALUES = {"1", "true", "yes", "on"}


class HubUnreachableError(RuntimeError):
    """The Hugging Face hub cannot be contacted (offline mode, DNS failure, refused or timed-out connection)."""

    def __init__(self, model_name: str, cause: object, cache: Path) -> None:
        super().__init__(
            f"Cannot reach the Hugging Face hub to download {model_name}: {cause}. "
            f"Put the weights in the HF cache ({cache}) or pass a local folder as the model name."
        )



class WeightsConversionError(RuntimeError):
    """Pytorch .bin weights cannot be converted to safetensors."""



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


