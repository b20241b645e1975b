"""Continuous batching: which tokens of which sequences run in the next step.

Each step takes, oldest first, one token of every decoding sequence and chunks of prompts still
being prefilled, under a per-step token budget; waiting requests join between steps as blocks
allow. Every sequence lives on one attention shard and uses that shard's blocks. When a shard
runs out, the newest sequence on it is preempted: its blocks are freed and it is recomputed
(prompt + tokens so far) when it is admitted again; it never corrupts or crashes another
sequence. With a sliding window, blocks wholly outside the window of a sequence's next query are
freed as it advances. Which blocks a sequence holds is `cluster.engine.block_manager.BlockManager`'s
business; this decides which sequences run and when they wait.

Prefix caching: a sequence's full blocks are keyed by their tokens and everything before them
(`cluster.engine.block_pool.block_key`) as they fill. At admission a sequence takes the cached blocks of
its longest cached prefix instead of recomputing them, on the shard that holds the most of it
among those with room (otherwise the one with the most free blocks). It always computes at least
its last token, so the step has logits to sample from and shared blocks are never written.

Forks: the choices of an `n` > 1 request are one sequence until its prompt is computed, then
`fork` gives each other choice the same blocks, with its own copy of a last, partly filled block.
"""

from __future__ import annotations

import itertools
import logging
from collections import deque
from collections.abc import Sequence as Seq
from dataclasses import dataclass

from cluster.engine.block_manager import BlockManager
from cluster.engine.sequence import Sequence, Status
from protocol.config import EngineSection

logger = logging.getLogger(__name__)


@dataclass
class Chunk:
    """Tokens `seq.tokens[start:end]` run this step; `sample` when they reach the sequence's end."""

    seq: Sequence
    start: int
    end: int

    @property
    def sample(self) -> bool:
        return self.end == len(self.seq.tokens)


@dataclass
class Schedule:
    chunks: list[Chunk]
    preempted: list[Sequence]


class Scheduler:
    def __init__(
        self,
        num_shards: int,
        blocks_per_shard: int,
        block_size: int,
        max_batched_tokens: int = 512,
        max_seqs: int = 256,
        window: int | None = None,
        prefix_caching: bool = True,
    ) -> None:
        if max_batched_tokens < 1 or max_seqs < 1 or block_size < 1:
            raise ValueError("max_batched_tokens, max_seqs and block_size must be positive")
        self.block_size = block_size
        self.max_batched_tokens = max_batched_tokens
        self.max_seqs = max_seqs
        self.blocks = BlockManager(num_shards, blocks_per_shard, block_size, window, prefix_caching)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in arrival order
        self._arrivals = itertools.count()
        self.num_preemptions = 0

    @classmethod
    def of(cls, settings: EngineSection, num_shards: int, blocks_per_shard: int, window: int | None) -> Scheduler:
        """The scheduler an engine with `settings` runs (the model's sliding `window`, if any)."""
        return cls(num_shards, blocks_per_shard, settings.block_size, settings.max_batched_tokens, settings.max_seqs,
                   window, settings.prefix_caching)  # fmt: skip

    # ---- requests ----------------------------------------------------------------------------

    def check_fits(self, request_id: str, total_tokens: int) -> None:
        """ValueError when a sequence of `total_tokens` could never hold its blocks on a shard."""
        need = self.blocks.max_blocks_per_sequence(total_tokens, self.max_batched_tokens)
        have = self.blocks.blocks_per_shard
        if need > have:
            raise ValueError(
                f"request {request_id} needs up to {need} KV blocks of {self.block_size} tokens, "
                f"but a shard has {have}; shorten the prompt or max_tokens, or give the cache more memory"
            )

    def add(self, request_id: str, prompt: list[int], max_tokens: int, reuse: bool = True) -> Sequence:
        self.check_fits(request_id, len(prompt) + max_tokens)
        seq = Sequence(request_id, list(prompt), max_tokens, next(self._arrivals), reuse=reuse)
        self.waiting.append(seq)
        return seq

    def finish(self, seq: Sequence) -> None:
        """Release a sequence for good (finished or aborted), wherever it is."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq.status is Status.WAITING:
            self.waiting.remove(seq)
        self.blocks.free_all(seq)
        seq.status = Status.FINISHED

    def fork(self, seq: Sequence, request_id: str) -> tuple[Sequence, tuple[int, int] | None]:
        """A new choice of `seq`, whose prompt is computed: same prompt, sharing `seq`'s blocks (the
        caller appends its first token, drawn from `seq`'s logits, as it does for `seq`'s own).
        Returns it and the (source, destination) block copy its shard must make before its next
        step: its own copy of a partly filled last block, if there is one. With no block left for
        that copy it waits, to be recomputed (from the cached prefix) like a preempted sequence."""
        assert seq.num_computed == len(seq.prompt) and not seq.output, "forks are made as the prompt completes"
        child = Sequence(request_id, list(seq.prompt), seq.max_tokens, next(self._arrivals), shard=seq.shard,
                         reuse=seq.reuse, forked=True, keys=list(seq.keys))  # fmt: skip
        placed, copy = self.blocks.fork(seq, child)
        if not placed:
            child.status = Status.WAITING
            self.waiting.appendleft(child)
            return child, None
        child.status = Status.RUNNING
        self.running.append(child)
        return child, copy

    def reset_shard(self, shard: int) -> None:
        """`shard`'s KV cache is gone (its worker was replaced): every sequence on it starts over, as if
        preempted, and nothing it had cached can be reused."""
        for seq in [s for s in self.running if s.shard == shard]:
            self._preempt(seq, f"its KV cache on shard {shard} was lost")
        for seq in self.waiting:
            if seq.shard == shard:
                seq.block_table, seq.num_computed, seq.registered = [], 0, 0
        self.blocks.reset(shard)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def blocks_in_use(self) -> int:
        return self.blocks.blocks_in_use()

    # ---- one step ------------------------------------------------------------------------------

    def schedule(self) -> Schedule:
        budget = self.max_batched_tokens
        chunks: list[Chunk] = []
        preempted: list[Sequence] = []
        scheduled: set[int] = set()
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not Status.RUNNING:  # preempted by an older sequence this step
                continue
            n = min(len(seq.tokens) - seq.num_computed, budget)
            self.blocks.release_outside_window(seq, seq.num_computed)
            while not self.blocks.grow(seq, seq.num_computed + n):
                victim = self._newest_unscheduled(seq.shard, scheduled, exclude=seq) or seq
                self._preempt(victim, f"KV blocks exhausted on shard {victim.shard}")
                preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is Status.RUNNING:
                chunks.append(Chunk(seq, seq.num_computed, seq.num_computed + n))
                scheduled.add(id(seq))
                budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_seqs:
            seq = self.waiting[0]
            if not self._admit(seq, budget):
                break  # no room now; retry after some sequence finishes
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            end = min(len(seq.tokens), seq.num_computed + budget)
            chunks.append(Chunk(seq, seq.num_computed, end))
            budget -= end - seq.num_computed
        return Schedule(chunks, preempted)

    def advance(self, chunks: Seq[Chunk]) -> None:
        """Record that the step ran: the chunks' keys/values are now cached, and blocks they filled
        are offered to the prefix cache."""
        for c in chunks:
            c.seq.num_computed = c.end
            self.blocks.register_filled(c.seq)

    def _admit(self, seq: Sequence, budget: int) -> bool:
        """Place a waiting sequence: its shard, the cached prefix it takes, blocks for its first chunk."""
        if seq.pinned:  # its sampling state lives on its shard: it returns there
            candidates = [(seq.shard, self.blocks.prefix_on(seq, seq.shard))]
        else:
            pools = self.blocks.pools
            by_prefix = [(s, self.blocks.prefix_on(seq, s)) for s in range(len(pools))]
            candidates = sorted(by_prefix, key=lambda sp: (-len(sp[1]), -pools[sp[0]].num_free))
        for shard, prefix in candidates:  # the most cached prefix first, where its first chunk fits
            seq.shard = shard
            self.blocks.take_prefix(seq, prefix)
            end = min(len(seq.tokens), seq.num_computed + budget)
            if self.blocks.grow(seq, end):
                return True
            self.blocks.free_all(seq)
        if not seq.pinned:
            seq.shard = -1
        return False

    def _newest_unscheduled(self, shard: int, scheduled: set[int], exclude: Sequence) -> Sequence | None:
        for seq in reversed(self.running):
            if seq.shard == shard and seq is not exclude and id(seq) not in scheduled:
                return seq
        return None

    def _preempt(self, seq: Sequence, why: str) -> None:
        logger.info("preempting %s (%s); it will be recomputed", seq.request_id, why)
        self.running.remove(seq)
        self.blocks.free_all(seq)
        seq.status = Status.WAITING
        seq.preemptions += 1
        self.num_preemptions += 1
        # Back in arrival order among the waiting, so the oldest preempted work resumes first.
        pos = next((i for i, w in enumerate(self.waiting) if w.arrival > seq.arrival), len(self.waiting))
        self.waiting.insert(pos, seq)
