"""The scheduler's KV block pool: allocation, sharing, prefix hashing, LRU eviction (no sockets, no model)."""

from __future__ import annotations

from services.scheduler.blocks import BlockManager, BlockTable, blocks_for


def test_grow_allocates_whole_blocks_and_refuses_without_partial_change():
    pool = BlockManager(num_blocks=4, block_size=4)
    table = BlockTable()
    assert pool.grow(table, 5) and table.blocks == [0, 1] and pool.num_free == 2
    assert pool.grow(table, 8) and table.blocks == [0, 1]  # still fits
    other = BlockTable()
    assert not pool.grow(other, 9) and other.blocks == [] and pool.num_free == 2
    assert blocks_for(9, 4) == 3 and blocks_for(0, 4) == 0


def test_shared_prefix_is_reference_counted():
    pool = BlockManager(num_blocks=8, block_size=2)
    tokens = [1, 2, 3, 4, 5]
    first = BlockTable()
    pool.grow(first, 5)
    pool.register(first, tokens, 5)  # blocks [1 2] and [3 4] are full
    blocks, hashes = pool.cached_prefix(tokens, limit=4)
    assert blocks == first.blocks[:2]
    second = BlockTable()
    pool.take_prefix(second, blocks, hashes)
    assert [pool.ref_counts[b] for b in blocks] == [2, 2]
    pool.release(first)
    assert [pool.ref_counts[b] for b in blocks] == [1, 1] and pool.num_free == 8 - 2
    # A different prefix shares nothing; the chain hash sees the whole prefix, not one block.
    assert pool.cached_prefix([9, 9, 3, 4], limit=4) == ([], [])


def test_freed_cached_blocks_are_reused_then_evicted_least_recent_first():
    pool = BlockManager(num_blocks=3, block_size=2)
    a, b = BlockTable(), BlockTable()
    pool.grow(a, 2)
    pool.register(a, [1, 2], 2)
    pool.grow(b, 2)
    pool.register(b, [3, 4], 2)
    b_block = b.blocks[0]
    pool.release(a)  # freed first: evicted first
    pool.release(b)
    assert pool.cached_prefix([1, 2, 0], 2)[0] and pool.cached_prefix([3, 4, 0], 2)[0]
    c = BlockTable()
    pool.grow(c, 4)  # takes the never-used block, then a's cached one
    assert pool.cached_prefix([1, 2, 0], 2) == ([], [])
    assert pool.cached_prefix([3, 4, 0], 2)[0] == [b_block]  # the more recently freed one survives


def test_prefix_caching_off_and_reset():
    pool = BlockManager(num_blocks=2, block_size=2, prefix_caching=False)
    table = BlockTable()
    pool.grow(table, 2)
    pool.register(table, [1, 2], 2)
    assert pool.cached_prefix([1, 2, 3], 2) == ([], [])
    pool.reset()
    assert pool.num_free == 2 and pool.ref_counts == [0, 0]
