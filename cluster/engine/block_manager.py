"""The KV blocks of every sequence: one `BlockPool` per attention shard and each sequence's block
table on it. The scheduler decides which sequences run; this decides which blocks they hold.

A sequence grows block by block as its tokens are scheduled (`grow`), gives back those wholly
outside its sliding window as it advances (`release_outside_window`), offers the blocks it
filled to the prefix cache (`register_filled`), starts from a cached prefix when one is there
(`prefix_on`, `take_prefix`), and lets everything go when it finishes or is preempted
(`free_all`). A fork shares its parent's full blocks and gets its own copy of a partly filled
last one (`fork`).
"""

from __future__ import annotations

from cluster.engine.block_pool import BlockKey, BlockPool, block_key, blocks_needed
from cluster.engine.sequence import Sequence
from model.attention_plan import first_visible
from model.kv_cache import FREED


class BlockManager:
    def __init__(
        self, num_shards: int, blocks_per_shard: int, block_size: int, window: int | None, prefix_caching: bool
    ) -> None:
        self.block_size = block_size
        self.window = window
        self.pools = [BlockPool(blocks_per_shard, prefix_caching) for _ in range(num_shards)]

    @property
    def blocks_per_shard(self) -> int:
        return self.pools[0].num_blocks

    def blocks_in_use(self) -> int:
        return sum(p.num_used for p in self.pools)

    def max_blocks_per_sequence(self, total_tokens: int, max_batched_tokens: int) -> int:
        """Blocks a sequence of `total_tokens` can hold at once (bounded by the window if any), when
        a step runs at most `max_batched_tokens` of it."""
        full = blocks_needed(total_tokens, self.block_size)
        if self.window is None:
            return full
        # Keys of the window before the chunk, the chunk itself, and one partial block at each end.
        return min(full, blocks_needed(self.window - 1 + max_batched_tokens, self.block_size) + 1)

    def reset(self, shard: int) -> None:
        """`shard`'s cache is gone: a fresh pool, nothing cached (its sequences were let go first)."""
        old = self.pools[shard]
        self.pools[shard] = BlockPool(old.num_blocks, old.caching)

    def grow(self, seq: Sequence, num_tokens: int) -> bool:
        """Give `seq` blocks for its first `num_tokens` positions; False (holding what it had) if none left."""
        pool = self.pools[seq.shard]
        while len(seq.block_table) < blocks_needed(num_tokens, self.block_size):
            block = pool.allocate()
            if block is None:
                return False
            seq.block_table.append(block)
        return True

    def release_outside_window(self, seq: Sequence, first_query: int) -> None:
        """Free `seq`'s blocks that no query from `first_query` on sees."""
        if self.window is None:
            return
        lowest_key = first_visible(first_query, self.window)
        pool = self.pools[seq.shard]
        for j, block in enumerate(seq.block_table):
            if (j + 1) * self.block_size > lowest_key:
                break
            if block != FREED:
                pool.free(block)
                seq.block_table[j] = FREED

    def free_all(self, seq: Sequence) -> None:
        if seq.shard >= 0:
            pool = self.pools[seq.shard]
            for b in seq.block_table:
                if b != FREED:
                    pool.free(b)
        seq.block_table = []
        seq.num_computed = 0
        seq.registered = 0

    def register_filled(self, seq: Sequence) -> None:
        """Offer the blocks `seq` has filled since the last call to the prefix cache."""
        full = seq.num_computed // self.block_size
        keys = self.keys(seq, full)
        pool = self.pools[seq.shard]
        for j in range(seq.registered, full):
            if seq.block_table[j] != FREED:
                pool.register(seq.block_table[j], keys[j])
        seq.registered = max(seq.registered, full)

    def prefix_on(self, seq: Sequence, shard: int) -> list[int]:
        """The cached blocks of `seq`'s longest cached prefix on `shard` (never its last token's block)."""
        if not seq.reuse or not self.pools[shard].caching:
            return []
        reusable = (len(seq.tokens) - 1) // self.block_size  # leave the last token to compute
        return self.pools[shard].cached_prefix(self.keys(seq, reusable))

    def take_prefix(self, seq: Sequence, blocks: list[int]) -> None:
        """Start `seq` from cached `blocks`; with a window, those wholly before it are not needed."""
        pool = self.pools[seq.shard]
        computed = len(blocks) * self.block_size
        lowest_key = first_visible(computed, self.window)
        seq.block_table = []
        for j, block in enumerate(blocks):
            if (j + 1) * self.block_size <= lowest_key:
                seq.block_table.append(FREED)
            else:
                pool.share(block)
                seq.block_table.append(block)
        seq.num_computed = computed
        seq.registered = len(blocks)
        if seq.preemptions == 0 and not seq.forked:
            seq.cached_tokens = computed

    def fork(self, parent: Sequence, child: Sequence) -> tuple[bool, tuple[int, int] | None]:
        """Give `child` `parent`'s computed blocks: its full ones shared, a copy of a partly filled
        last one. (False, None) when no block is left for that copy (the child holds nothing);
        else (True, the (source, destination) copy its shard must make, if any)."""
        pool = self.pools[parent.shard]
        full = parent.num_computed // self.block_size
        copy: tuple[int, int] | None = None
        if parent.num_computed % self.block_size:  # the last block is partly filled: the child writes into it
            block = pool.allocate()
            if block is None:
                return False, None
            copy = (parent.block_table[full], block)
        for b in parent.block_table[:full]:
            if b != FREED:
                pool.share(b)
        child.block_table = parent.block_table[:full] + ([copy[1]] if copy else [])
        child.num_computed = parent.num_computed
        child.registered = min(parent.registered, full)
        return True, copy

    def keys(self, seq: Sequence, num_blocks: int) -> list[BlockKey]:
        """Keys of `seq`'s first `num_blocks` full blocks, computed once as its tokens are known."""
        tokens, b = seq.tokens, self.block_size
        while len(seq.keys) < num_blocks:
            j = len(seq.keys)
            seq.keys.append(block_key(seq.keys[-1] if seq.keys else None, tokens[j * b : (j + 1) * b]))
        return seq.keys[:num_blocks]
