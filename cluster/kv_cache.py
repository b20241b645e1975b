"""KV block bookkeeping on the engine side: one free list per attention shard.

The blocks themselves live on the shards (`model.kv_cache.KVCache`); the engine only hands out
block ids and writes them into each sequence's block table, which travels with every step.
"""

from __future__ import annotations

import math

import torch

from model.config import ModelConfig
from model.kv_cache import KVCache


class BlockAllocator:
    """Free list of one shard's blocks."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() hands out 0, 1, 2, ... first
        self._used: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return len(self._used)

    def allocate(self) -> int | None:
        if not self._free:
            return None
        block = self._free.pop()
        self._used.add(block)
        return block

    def free(self, block: int) -> None:
        if block not in self._used:
            raise ValueError(f"block {block} is not allocated (double free?)")
        self._used.remove(block)
        self._free.append(block)


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
