"""Paged key/value storage and the per-call binding of sequences to its blocks.

Shape legend: L = layers, N = blocks in the pool, B = tokens per block, Hkv = kv heads,
D = head dim.

The pool is plain tensors; *which* blocks a sequence owns is the block manager's business
(the engine's scheduler). The model only needs, per call, each sequence's block table:
`block_tables[s][j]` is the physical block holding that sequence's positions
`j*B .. j*B + B - 1`, or `FREED` once a sliding window has moved past it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model.config import ModelConfig

FREED = -1  # block-table entry of a block released because it fell wholly outside the sliding window


@dataclass
class KVCache:
    """Key and value block pools for every layer: k, v [L, N, B, Hkv, D]."""

    k: torch.Tensor
    v: torch.Tensor

    @classmethod
    def allocate(
        cls,
        config: ModelConfig,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> KVCache:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks ({num_blocks}) and block_size ({block_size}) must be positive")
        shape = (config.num_layers, num_blocks, block_size, config.num_kv_heads, config.head_dim)
        return cls(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))

    @property
    def num_blocks(self) -> int:
        return int(self.k.shape[1])

    @property
    def block_size(self) -> int:
        return int(self.k.shape[2])

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy each (source, destination) block's keys and values, every layer."""
        if not pairs:
            return
        src = torch.tensor([s for s, _ in pairs], dtype=torch.long, device=self.k.device)
        dst = torch.tensor([d for _, d in pairs], dtype=torch.long, device=self.k.device)
        self.k[:, dst] = self.k[:, src]  # [L, P, B, Hkv, D]
        self.v[:, dst] = self.v[:, src]

    @staticmethod
    def bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        """Bytes one block costs across all layers, keys and values."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * config.num_layers * block_size * config.num_kv_heads * config.head_dim * itemsize


@dataclass
class CacheBatch:
    """A forward call's view of the cache: the pool plus one block table per packed sequence."""

    cache: KVCache
    block_tables: list[list[int]]

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat slot views of layer i's pools: [N*B, Hkv, D] each."""
        k, v = self.cache.k[i], self.cache.v[i]
        return k.view(-1, *k.shape[2:]), v.view(-1, *v.shape[2:])
