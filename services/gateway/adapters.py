"""LoRA adapter lookup at validation (`adapter_id`): the adapter checked against the model, or the call refused.

The gateway reads the same ADAPTER_CACHE folder as the workers (a shared
volume in deployments) and checks, before anything is queued, what the vLLM
TGIS adapter checks (id characters, no path escape, the folder and its
adapter_config.json, peft_type LORA; its messages) and more: the options
served here, and that every A/B pair targets a layer the model's workers
serve LoRA on with the layer's shape (from the safetensors header, without
loading tensors; `.bin` weights are checked by the workers when they load).
Checked ids are remembered (the adapter's files are not expected to change
under a running server, as the adapter's own cache assumes).
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict

from services.common.lora_adapters import (
    ADAPTER_NOT_FOUND,
    ADAPTERS_DISABLED,
    AdapterError,
    check_fit,
    find_adapter,
    safetensors_shapes,
)
from services.common.protocol import ModelInfo
from services.gateway.validation import ValidationError

log = logging.getLogger(__name__)

REMEMBERED = 1024  # checked adapter ids kept (least recently used dropped first)


def check_adapter(root: str, adapter_id: str, model: ModelInfo) -> None:
    """AdapterError unless `adapter_id` names a LoRA adapter in `root` that fits `model` (blocking: files)."""
    files = find_adapter(root, adapter_id)
    if not model.lora_modules:  # whatever the adapter: this model takes none
        check_fit(adapter_id, {}, model.lora_modules)
    if files.weights.suffix == ".safetensors":  # a .bin adapter is checked by the workers when they load it
        try:
            shapes = safetensors_shapes(files.weights)
        except (OSError, ValueError, KeyError) as exc:
            raise AdapterError(ADAPTER_NOT_FOUND.format(adapter_id, f"unreadable {files.weights.name}: {exc}")) from exc
        check_fit(adapter_id, shapes, model.lora_modules)


class AdapterLookup:
    """Validation's view of ADAPTER_CACHE; file checks run in a thread."""

    def __init__(self, root: str | None) -> None:
        self.root = root
        self._checked: OrderedDict[str, None] = OrderedDict()
        self._locks: dict[str, asyncio.Lock] = {}

    async def check(self, adapter_id: str, model: ModelInfo) -> None:
        """Nothing when the adapter can be served; ValidationError in the vLLM TGIS adapter's words otherwise."""
        if not self.root or not model.max_loras:  # the adapter's message, naming the id
            raise ValidationError(ADAPTER_NOT_FOUND.format(adapter_id, ADAPTERS_DISABLED))
        if adapter_id in self._checked:
            self._checked.move_to_end(adapter_id)
            return
        # One check per id at a time, as the adapter's load locks do; different ids in parallel.
        async with self._locks.setdefault(adapter_id, asyncio.Lock()):
            try:
                if adapter_id not in self._checked:
                    await asyncio.to_thread(check_adapter, self.root, adapter_id, model)
            except AdapterError as exc:
                log.info("adapter %s refused: %s", adapter_id, exc)
                raise ValidationError(str(exc)) from exc
            finally:
                self._locks.pop(adapter_id, None)
        self._checked[adapter_id] = None
        while len(self._checked) > REMEMBERED:
            self._checked.popitem(last=False)
