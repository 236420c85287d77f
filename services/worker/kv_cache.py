"""The worker's paged KV cache: one pool of fixed-size blocks per layer, sized from a memory budget.

The scheduler owns which sequence holds which block; the worker only stores
K/V where a step's block tables say.  On CPU the pool is an anonymous memory
map: its pages read as zeros and take physical memory only once written, so
a generous budget costs nothing until sequences use it.
"""

from __future__ import annotations

import logging
import mmap
import os
import re

import torch

logger = logging.getLogger(__name__)

DEFAULT_CPU_FRACTION = 0.25  # of physical memory, for `auto` on CPU
DEFAULT_GPU_FRACTION = 0.9  # of the GPU memory free after loading, for `auto` on GPU
_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_memory(text: str) -> int | None:
    """'auto' -> None; '4GiB', '512M', '1.5g', '1000000' -> bytes."""
    text = text.strip().lower()
    if text == "auto":
        return None
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?", text)
    if not match:
        raise ValueError(f"KV cache memory must be 'auto' or a size like 4GiB or 512MiB, got {text!r}")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def bytes_per_token(num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """K and V of one token position in every layer."""
    return 2 * num_layers * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


def budget_bytes(setting: str, device: torch.device) -> int:
    """The KV pool's size in bytes for a KV_CACHE_MEMORY setting on `device`."""
    explicit = parse_memory(setting)
    if explicit is not None:
        return explicit
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free * DEFAULT_GPU_FRACTION)
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * DEFAULT_CPU_FRACTION)


def _zeroed(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    size = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
    buffer = mmap.mmap(-1, max(size, 1))  # anonymous: zero pages, resident only once written
    return torch.frombuffer(buffer, dtype=dtype, count=torch.Size(shape).numel()).view(shape)


class PagedKVCache:
    """Per-layer K and V pools `[num_blocks, block_size, kv_heads, head_dim]`."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.num_blocks, self.block_size = num_blocks, block_size
        shape = (num_blocks, block_size, kv_heads, head_dim)
        self.k = [_zeroed(shape, dtype, device) for _ in range(num_layers)]
        self.v = [_zeroed(shape, dtype, device) for _ in range(num_layers)]

    @classmethod
    def for_budget(cls, budget: int, min_tokens: int, num_layers: int, block_size: int, kv_heads: int,
                   head_dim: int, dtype: torch.dtype, device: torch.device) -> PagedKVCache:
        """As many blocks as `budget` bytes hold; at least enough for one sequence of `min_tokens`."""
        per_block = block_size * bytes_per_token(num_layers, kv_heads, head_dim, dtype)
        num_blocks = budget // per_block
        needed = -(-min_tokens // block_size)
        if num_blocks < needed:
            raise ValueError(
                f"the KV cache budget of {budget / 2**20:.0f} MiB holds {num_blocks} blocks of {block_size} tokens, "
                f"fewer than one sequence of max_sequence_length {min_tokens} needs ({needed}); "
                f"raise KV_CACHE_MEMORY or lower MAX_SEQUENCE_LENGTH")
        logger.info("KV cache: %d blocks of %d tokens (%d token positions, %.0f MiB, %s)", num_blocks, block_size,
                    num_blocks * block_size, num_blocks * per_block / 2**20, str(dtype).removeprefix("torch."))
        return cls(num_layers, num_blocks, block_size, kv_heads, head_dim, dtype, device)
