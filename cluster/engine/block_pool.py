"""KV block bookkeeping on the engine side: one `BlockPool` per attention shard.

The blocks themselves live on the shards (`model.kv_cache.KVCache`); the engine only hands out
block ids and writes them into each sequence's block table, which travels with every step.

Blocks are counted by their holders: sequences that share a prompt prefix (automatic prefix
caching) or a prompt (the choices of an `n` > 1 request) hold the same blocks. A full block is
keyed by a hash of its tokens and of everything before them (`block_key`). When its last holder
lets go, a keyed block stays cached: a later sequence whose prefix has the same keys takes it
back instead of recomputing it. Free blocks are handed out first; cached ones are evicted, least
recently used first, only when no free block is left.
"""

from __future__ import annotations

import hashlib
import math
from array import array
from collections import OrderedDict
from collections.abc import Sequence

import torch

from model.config import ModelConfig
from model.kv_cache import KVCache

BlockKey = bytes


def block_key(parent: BlockKey | None, tokens: Sequence[int]) -> BlockKey:
    """The key of a full block: its tokens and, through its parent's key, every token before them."""
    h = hashlib.blake2b(digest_size=16)  # 128 bits: a collision would silently serve another prefix's KV
    h.update(parent or b"root")
    h.update(array("q", tokens).tobytes())
    return h.digest()


class BlockPool:
    """One shard's blocks: free, held (with a holder count), and cached (keyed, held by no one)."""

    def __init__(self, num_blocks: int, caching: bool = True) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.num_blocks = num_blocks
        self.caching = caching
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() hands out 0, 1, 2, ... first
        self._holders: dict[int, int] = {}
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached and unheld, least recently used first
        self._block_of: dict[BlockKey, int] = {}
        self._key_of: dict[int, BlockKey] = {}

    @property
    def num_free(self) -> int:
        """Blocks a sequence can get now: free ones and cached ones no sequence holds."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used(self) -> int:
        """Blocks some sequence holds."""
        return len(self._holders)

    @property
    def num_cached(self) -> int:
        """Blocks whose content is keyed, held or not."""
        return len(self._key_of)

    def allocate(self) -> int | None:
        """A block for one holder, or None when every block is held."""
        if self._free:
            block = self._free.pop()
        elif self._evictable:
            block, _ = self._evictable.popitem(last=False)
            del self._block_of[self._key_of.pop(block)]
        else:
            return None
        self._holders[block] = 1
        return block

    def share(self, block: int) -> None:
        """One more holder of a held or cached block."""
        if block in self._holders:
            self._holders[block] += 1
        elif block in self._evictable:
            del self._evictable[block]
            self._holders[block] = 1
        else:
            raise ValueError(f"block {block} is neither held nor cached")

    def free(self, block: int) -> None:
        """One holder lets go; the last one returns the block to the cache (if keyed) or the free list."""
        holders = self._holders.get(block)
        if holders is None:
            raise ValueError(f"block {block} is not allocated (double free?)")
        if holders > 1:
            self._holders[block] = holders - 1
            return
        del self._holders[block]
        if block in self._key_of:
            self._evictable[block] = None  # most recently used last
        else:
            self._free.append(block)

    def register(self, block: int, key: BlockKey) -> None:
        """`block` is full and holds the content `key` names: later prefixes with that key may reuse it.
        A second block with the same content (computed at the same time) stays unkeyed."""
        if self.caching and key not in self._block_of and block not in self._key_of:
            self._block_of[key] = block
            self._key_of[block] = key

    def cached_prefix(self, keys: Sequence[BlockKey]) -> list[int]:
        """The blocks holding the longest prefix of `keys`, in order."""
        blocks = []
        for key in keys:
            block = self._block_of.get(key)
            if block is None:
                break
            blocks.append(block)
        return blocks


def blocks_for_budget(config: ModelConfig, block_size: int, dtype: torch.dtype, budget_bytes: int) -> int:
    """How many blocks of `block_size` tokens a shard's KV memory budget holds (all layers, k and v)."""
    per_block = KVCache.bytes_per_block(config, block_size, dtype)
    n = budget_bytes // per_block
    if n < 1:
        raise ValueError(
            f"a KV budget of {budget_bytes} bytes holds no block of {block_size} tokens ({per_block} bytes each)"
        )
    return int(n)


def blocks_needed(num_tokens: int, block_size: int) -> int:
    return math.ceil(num_tokens / block_size)
