"""Tuned prompt prefixes (`prefix_id`): loading them from PREFIX_STORE_PATH with TGIS's checks, in a size-bounded LRU.

Both ends of the pipeline use this store, on the same files: the gateway
looks a prefix up at validation (its length counts against the limits, and a
bad or missing prefix is refused before queueing), and every worker rank loads
it again when a sequence using it starts (the embeddings replace those of the
placeholder positions in front of the prompt), reloading it if its cache
evicted it meanwhile.  torch is imported on first use only, so a gateway
without prefixes never loads it.
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

PREFIX_ID = re.compile(r"[/\w\-]+")
CACHE_ROUNDING = 512  # bytes: a prefix's size in the cache is rounded up to a multiple of this


def store_folder(root: Path, item_id: str) -> Path | None:
    """`root / item_id` resolved, or None when the id has characters other than word characters, `-` and `/`, or
    leads out of `root` (an absolute id): the rule TGIS has for prefix ids and the vLLM TGIS adapter for adapter ids."""
    folder = (root / item_id).resolve()
    return folder if PREFIX_ID.fullmatch(item_id) and folder.is_relative_to(root) else None


class PrefixNotFound(LookupError):
    """No prefix with this id in the store (gRPC NOT_FOUND at TGIS's shard)."""


class PrefixError(ValueError):
    """The prefix id or its files are not acceptable; the text is TGIS's message."""


def max_prefix_length(setting: int | None, max_sequence_length: int) -> int:
    """MAX_PROMPT_PREFIX_LENGTH, by default half the context (rounded up); it must stay below the context."""
    length = math.ceil(0.5 * max_sequence_length) if setting is None else setting
    if length > max_sequence_length - 1:
        raise ValueError(f"MAX_PROMPT_PREFIX_LENGTH ({length}) must be <= max_sequence_length - 1 "
                         f"({max_sequence_length - 1})")
    return length


@dataclass(frozen=True)
class PrefixModel:
    """What a prefix must match: the model's embedding width and dtype, its kind, the longest prefix allowed."""

    hidden_size: int
    dtype: str  # "float32", "float16", "bfloat16"
    encoder_decoder: bool
    max_length: int


@dataclass(frozen=True)
class Prefix:
    """A loaded prefix: its decoder (and, for encoder-decoder models, encoder) embeddings in the model dtype, and
    its length as TGIS counts it (decoder-only: the rows; encoder-decoder: encoder rows + decoder rows + 1, the
    decoder start token appended to a decoder prefix)."""

    decoder: torch.Tensor | None
    encoder: torch.Tensor | None
    length: int

    @property
    def size(self) -> int:
        raw = sum(t.numel() * t.element_size() for t in (self.encoder, self.decoder) if t is not None)
        return -(-raw // CACHE_ROUNDING) * CACHE_ROUNDING


class PrefixStore:
    """Loads prefixes from `<path>/<prefix_id>/` and keeps the recently used ones within `cache_bytes`."""

    def __init__(self, path: str | Path, model: PrefixModel, cache_bytes: int) -> None:
        self.path, self.model, self.cache_bytes = Path(path).resolve(), model, cache_bytes
        self._cache: OrderedDict[str, Prefix] = OrderedDict()
        self._used = 0

    def get(self, prefix_id: str) -> Prefix:
        """The prefix, from the cache or loaded (and cached); PrefixNotFound or PrefixError otherwise."""
        if prefix_id in self._cache:
            self._cache.move_to_end(prefix_id)
            return self._cache[prefix_id]
        prefix = self._load(prefix_id)
        if prefix.size > self.cache_bytes:
            raise PrefixError(f"Prefix ID object {prefix_id} exceeds the allowed cache size")
        while self._used + prefix.size > self.cache_bytes:
            _, evicted = self._cache.popitem(last=False)
            self._used -= evicted.size
        self._cache[prefix_id] = prefix
        self._used += prefix.size
        return prefix

    def cached(self, prefix_id: str) -> bool:
        return prefix_id in self._cache

    def _folder(self, prefix_id: str) -> Path:
        if not PREFIX_ID.fullmatch(prefix_id):
            raise PrefixError(f"Invalid prefix id {prefix_id}, must contain only alphanumeric, _ and - and /")
        folder = store_folder(self.path, prefix_id)
        if folder is None:
            raise PrefixError(f"Invalid prefix id {prefix_id}")
        return folder

    def _load(self, prefix_id: str) -> Prefix:
        import torch

        folder = self._folder(prefix_id)
        files = list(folder.iterdir()) if folder.is_dir() else []
        if any(file.name.split(".")[0] == "adapter_model" for file in files):  # a PEFT prompt-tuning adapter
            if self.model.encoder_decoder:
                raise PrefixError("encoder-decoder architectures not supported for peft models")
            if (folder / "adapter_model.safetensors").exists():
                from safetensors.torch import load_file

                state = load_file(folder / "adapter_model.safetensors")
            else:
                state = torch.load(folder / "adapter_model.bin", map_location="cpu", weights_only=True)
            decoder = self._checked(state.get("prompt_embeddings"))
            return Prefix(decoder, None, decoder.shape[0])
        decoder, encoder = folder / "decoder.pt", folder / "encoder.pt"
        if not decoder.exists() and (not self.model.encoder_decoder or not encoder.exists()):
            raise PrefixNotFound(f"Prefix id {prefix_id} not found")
        dec, enc = (self._checked(torch.load(file, map_location="cpu", weights_only=True)) if file.exists() else None
                    for file in (decoder, encoder))
        if not self.model.encoder_decoder:
            return Prefix(dec, None, dec.shape[0])
        return Prefix(dec, enc, (0 if enc is None else enc.shape[0]) + (0 if dec is None else dec.shape[0] + 1))

    def _checked(self, tensor: object) -> torch.Tensor:
        """TGIS's checks of one embedding tensor, then the tensor in the model dtype."""
        import torch

        if not isinstance(tensor, torch.Tensor) or tensor.dim() != 2:
            raise PrefixError("Invalid prefix embedding tensor")
        length, width = tensor.shape
        if not 0 < length <= self.model.max_length:
            raise PrefixError(f"Invalid prefix embedding length of {length}")
        if self.model.encoder_decoder and length % 2:
            raise PrefixError(f"Invalid prefix embedding length of {length}: encoder-decoder prefixes have even length")
        if width != self.model.hidden_size:
            raise PrefixError(f"Prefix embedding tensor dim {width} does not match model ({self.model.hidden_size})")
        if not torch.isfinite(tensor).all():
            raise PrefixError("Prefix contains non-finite elements")
        dtype = getattr(torch, self.model.dtype)
        converted = tensor.to(dtype)
        if not torch.isfinite(converted).all():
            raise PrefixError(f"Prefix contains non-finite elements after conversion from {tensor.dtype} to {dtype}")
        return converted
