"""The KV block pool as the scheduler sees it: allocation, sharing, prefix caching and LRU eviction (no sockets).

The workers hold the K/V tensors; the scheduler decides which sequence owns
which block, so it can admit by free blocks and preempt when they run out.
A block that a step fills completely is registered under the hash of its
tokens chained with the hash of the blocks before it, so a later prompt with
the same prefix reuses it instead of computing it again.  Freed blocks keep
their contents and hash and go to the back of the free list; allocation takes
from the front, so the least recently used cached block is evicted first.
"""

from __future__ import annotations

import array
import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field


def blocks_for(positions: int, block_size: int) -> int:
    """Blocks needed to hold `positions` token positions."""
    return -(-positions // block_size)


def chain_hash(previous: bytes, tokens: list[int] | array.array) -> bytes:
    """Hash of one full block's tokens given the hash of the blocks before it (collision-resistant)."""
    return hashlib.blake2b(previous + array.array("i", tokens).tobytes(), digest_size=16).digest()


@dataclass
class BlockTable:
    """One sequence's blocks, in position order, and the hashes of its leading full blocks already registered."""

    blocks: list[int] = field(default_factory=list)
    hashes: list[bytes] = field(default_factory=list)


class BlockManager:
    """Hands out block ids 0..num_blocks-1 with reference counts; reuses cached full blocks by content."""

    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True) -> None:
        self.num_blocks, self.block_size, self.prefix_caching = num_blocks, block_size, prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self.free)

    def usable(self, blocks: list[int]) -> int:
        """How many of `blocks` (a cached prefix) would come out of the free list if taken."""
        return sum(1 for block in blocks if self.ref_counts[block] == 0)

    def cached_prefix(self, tokens: list[int] | array.array, limit: int,
                      root: bytes = b"") -> tuple[list[int], list[bytes]]:
        """The cached blocks (and their hashes) holding the longest prefix of `tokens`, at most `limit` tokens.

        `root` starts the hash chain: sequences whose first positions hold something other than their token ids
        (a prompt prefix's embeddings) hash from a root of their own, so they share blocks only among themselves.
        """
        blocks, hashes, previous = [], [], root
        if not self.prefix_caching:
            return blocks, hashes
        for i in range(limit // self.block_size):
            digest = chain_hash(previous, tokens[i * self.block_size: (i + 1) * self.block_size])
            block = self.cached.get(digest)
            if block is None:
                break
            blocks.append(block)
            hashes.append(digest)
            previous = digest
        return blocks, hashes

    def take_prefix(self, table: BlockTable, blocks: list[int], hashes: list[bytes]) -> None:
        """Start an empty table with cached prefix blocks from `cached_prefix` (shared, reference counted)."""
        assert not table.blocks
        for block in blocks:
            if self.ref_counts[block] == 0:
                del self.free[block]
            self.ref_counts[block] += 1
        table.blocks, table.hashes = list(blocks), list(hashes)

    def grow(self, table: BlockTable, positions: int) -> bool:
        """Extend `table` to hold `positions` positions; False (and no change) when too few blocks are free."""
        missing = blocks_for(positions, self.block_size) - len(table.blocks)
        if missing <= 0:
            return True
        if missing > len(self.free):
            return False
        for _ in range(missing):
            block, _ = self.free.popitem(last=False)
            stale = self.block_hash[block]
            if stale is not None:
                if self.cached.get(stale) == block:
                    del self.cached[stale]
                self.block_hash[block] = None
            self.ref_counts[block] = 1
            table.blocks.append(block)
        return True

    def register(self, table: BlockTable, tokens: list[int] | array.array, computed: int, root: bytes = b"") -> None:
        """Make the table's blocks that `computed` positions fill completely reusable by their content (and root)."""
        if not self.prefix_caching:
            return
        full = min(computed // self.block_size, len(table.blocks))
        previous = table.hashes[-1] if table.hashes else root
        for i in range(len(table.hashes), full):
            digest = chain_hash(previous, tokens[i * self.block_size: (i + 1) * self.block_size])
            block = table.blocks[i]
            if digest not in self.cached and self.block_hash[block] is None:
                self.cached[digest] = block
                self.block_hash[block] = digest
            table.hashes.append(digest)
            previous = digest

    def release(self, table: BlockTable) -> None:
        """Drop the table's references; blocks nobody holds go to the free list, the table's tail first."""
        for block in reversed(table.blocks):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free[block] = None
        table.blocks, table.hashes = [], []

    def reset(self) -> None:
        """Forget every block and cached prefix (the workers' cache can no longer be trusted)."""
        self.__init__(self.num_blocks, self.block_size, self.prefix_caching)
