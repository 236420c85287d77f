"""The worker's side of prompt prefixes: each rank's store, a sequence's embeddings, and injecting them in a step.

A sequence with a prefix arrives with `prefix_length` placeholder ids in front
of its prompt (the gateway put them there, so the scheduler's block and
token accounting already covers them); the rank loads the prefix (from its
own LRU store, `services/common/prompt_prefixes.py`) and, in every chunk that
covers those positions, the prefix rows replace the placeholders' embeddings.
"""

from __future__ import annotations

import logging

import torch

from services.common.prompt_prefixes import (
    Prefix,
    PrefixError,
    PrefixModel,
    PrefixNotFound,
    PrefixStore,
    max_prefix_length,
)

logger = logging.getLogger(__name__)


def open_store(path: str | None, cache_size_mb: int, max_length: int | None, hidden_size: int, dtype: torch.dtype,
               max_sequence_length: int, encoder_decoder: bool = False) -> PrefixStore | None:
    """This rank's prefix store (None without PREFIX_STORE_PATH)."""
    if not path:
        return None
    model = PrefixModel(hidden_size, str(dtype).removeprefix("torch."), encoder_decoder,
                        max_prefix_length(max_length, max_sequence_length))
    logger.info("Prompt prefixes from %s (cache %d MiB, at most %d virtual tokens)", path, cache_size_mb,
                model.max_length)
    return PrefixStore(path, model, cache_size_mb * 2**20)


def load_prefix(store: PrefixStore | None, prefix_id: str, length: int, device: torch.device) -> Prefix:
    """The prefix `prefix_id` with its embeddings on `device`; LookupError in TGIS's words when it cannot be had
    (no store, gone, invalid now, or not the length validation saw)."""
    message = f"Error retrieving prompt prefix '{prefix_id}'"
    if store is None:
        raise LookupError(message)
    try:
        prefix = store.get(prefix_id)
    except (PrefixNotFound, PrefixError, OSError) as exc:
        logger.warning("%s: %s", message, exc)
        raise LookupError(message) from exc
    if prefix.length != length:
        raise LookupError(message)
    return Prefix(*(None if t is None else t.to(device) for t in (prefix.decoder, prefix.encoder)), prefix.length)


def embed_with_prefixes(model: torch.nn.Module, input_ids: torch.Tensor,
                        runs: list[tuple[torch.Tensor | None, int, int]]) -> torch.Tensor:
    """Embeddings [T, hidden] of the packed input_ids, with prefix rows where a run covers prefix positions.

    `runs` lists each packed run in order as (its sequence's prefix or None, start position, token count).
    """
    x = model.embed(input_ids)
    row = 0
    for prefix, start, count in runs:
        if prefix is not None and start < prefix.shape[0]:
            n = min(prefix.shape[0], start + count) - start
            x[row: row + n] = prefix[start: start + n]
        row += count
    return x


def covers_prefix(runs: list[tuple[torch.Tensor | None, int, int]]) -> bool:
    """Whether any run computes prefix positions (else the plain forward from ids is enough)."""
    return any(prefix is not None and start < prefix.shape[0] for prefix, start, _ in runs)
