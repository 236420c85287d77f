"""Prompt prefix lookup at validation: the prefix's length, or the request refused in TGIS's words.

The gateway loads the prefix itself, from the same PREFIX_STORE_PATH the
workers read (a shared volume in deployments), with the same checks and LRU
cache (`services/common/prompt_prefixes.py`): a missing or bad prefix is
refused before anything is queued, and the length it reports counts in the
limits.  The workers load it again for its embeddings when the sequence starts.
"""

from __future__ import annotations

import asyncio
import logging
import time

from services.common.prompt_prefixes import (
    PrefixError,
    PrefixModel,
    PrefixNotFound,
    PrefixStore,
    max_prefix_length,
)
from services.common.protocol import ModelInfo
from services.gateway.metrics import GatewayMetrics
from services.gateway.validation import ValidationError

log = logging.getLogger(__name__)


def lookup_error(prefix_id: str, cause: str) -> ValidationError:
    return ValidationError(f"can't retrieve prompt prefix with id '{prefix_id}': {cause}")


class PrefixLookup:
    """Validation's view of the prefix store; loads run in a thread, one at a time (the store is not shared)."""

    def __init__(self, metrics: GatewayMetrics, store: PrefixStore | None = None) -> None:
        self.metrics, self.store = metrics, store
        self._lock = asyncio.Lock()

    @classmethod
    def open(cls, path: str | None, cache_size_mb: int, max_length: int | None, model: ModelInfo,
             metrics: GatewayMetrics) -> PrefixLookup:
        """The lookup over PREFIX_STORE_PATH for `model` (without a path, every prefix id is not found)."""
        if not path:
            return cls(metrics)
        limit = max_prefix_length(max_length, model.max_sequence_length)
        model_view = PrefixModel(model.hidden_size, model.dtype, model.encoder_decoder, limit)
        return cls(metrics, PrefixStore(path, model_view, cache_size_mb * 2**20))

    async def length(self, prefix_id: str) -> int:
        """The prefix's length as TGIS counts it; ValidationError (and a load failure counted) otherwise."""
        started = time.monotonic()
        try:
            if self.store is None:  # no store: no prefix id can be found
                raise PrefixNotFound(prefix_id)
            async with self._lock:
                cached = self.store.cached(prefix_id)
                prefix = await asyncio.to_thread(self.store.get, prefix_id)
        except PrefixNotFound as exc:
            self.metrics.prompt_load_failure.inc()
            raise lookup_error(prefix_id, f'prefix id "{prefix_id}" not found') from exc
        except (PrefixError, OSError) as exc:
            self.metrics.prompt_load_failure.inc()
            log.info("prompt prefix %s refused: %s", prefix_id, exc)
            raise lookup_error(prefix_id, str(exc)) from exc
        if not cached:
            self.metrics.prompt_load_duration.observe(time.monotonic() - started)
        return prefix.length
