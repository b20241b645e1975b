"""Continuous batching: which tokens of which sequences run in the next step.

Each step takes, oldest first, one token of every decoding sequence and chunks of prompts still
being prefilled, under a per-step token budget; waiting requests join between steps as blocks
allow. Every sequence lives on one attention shard (chosen at admission: the one with most free
blocks) and uses that shard's blocks. When a shard runs out, the newest sequence on it is
preempted: its blocks are freed and it is recomputed (prompt + tokens so far) when it is
admitted again; it never corrupts or crashes another sequence. With a sliding window, blocks
wholly outside the window of a sequence's next query are freed as it advances.
"""

from __future__ import annotations

import itertools
import logging
from collections import deque
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from enum import Enum

from cluster.kv_cache import BlockAllocator, blocks_needed
from model.kv_cache import FREED

logger = logging.getLogger(__name__)


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    request_id: str
    prompt: list[int]
    max_tokens: int
    arrival: int
    output: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    shard: int = -1
    block_table: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose keys/values are in the cache
    preemptions: int = 0

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    @property
    def num_blocks_held(self) -> int:
        return sum(1 for b in self.block_table if b != FREED)


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
    ) -> None:
        if max_batched_tokens < 1 or max_seqs < 1 or block_size < 1:
            raise ValueError("max_batched_tokens, max_seqs and block_size must be positive")
        self.block_size = block_size
        self.max_batched_tokens = max_batched_tokens
        self.max_seqs = max_seqs
        self.window = window
        self.allocators = [BlockAllocator(blocks_per_shard) for _ in range(num_shards)]
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in arrival order
        self._arrivals = itertools.count()
        self.num_preemptions = 0

    # ---- requests ----------------------------------------------------------------------------

    def max_blocks_per_sequence(self, total_tokens: int) -> int:
        """Blocks a sequence of `total_tokens` can hold at once (bounded by the window if any)."""
        full = blocks_needed(total_tokens, self.block_size)
        if self.window is None:
            return full
        # Keys of the window before the chunk, the chunk itself, and one partial block at each end.
        return min(full, blocks_needed(self.window - 1 + self.max_batched_tokens, self.block_size) + 1)

    def check_fits(self, request_id: str, total_tokens: int) -> None:
        """ValueError when a sequence of `total_tokens` could never hold its blocks on a shard."""
        need = self.max_blocks_per_sequence(total_tokens)
        have = self.allocators[0].num_blocks
        if need > have:
            raise ValueError(
                f"request {request_id} needs up to {need} KV blocks of {self.block_size} tokens, "
                f"but a shard has {have}; shorten the prompt or max_tokens, or give the cache more memory"
            )

    def add(self, request_id: str, prompt: list[int], max_tokens: int) -> Sequence:
        self.check_fits(request_id, len(prompt) + max_tokens)
        seq = Sequence(request_id, list(prompt), max_tokens, next(self._arrivals))
        self.waiting.append(seq)
        return seq

    def finish(self, seq: Sequence) -> None:
        """Release a sequence for good (finished or aborted), wherever it is."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq.status is Status.WAITING:
            self.waiting.remove(seq)
        self._free_all(seq)
        seq.status = Status.FINISHED

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def blocks_in_use(self) -> int:
        return sum(a.num_used for a in self.allocators)

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
            self._release_outside_window(seq, seq.num_computed)
            while not self._grow(seq, seq.num_computed + n):
                victim = self._newest_unscheduled(seq.shard, scheduled, exclude=seq) or seq
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is Status.RUNNING:
                chunks.append(Chunk(seq, seq.num_computed, seq.num_computed + n))
                scheduled.add(id(seq))
                budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_seqs:
            seq = self.waiting[0]
            pinned = seq.preemptions > 0  # its sampling state lives on its shard: it returns there
            if not pinned:
                seq.shard = max(range(len(self.allocators)), key=lambda s: self.allocators[s].num_free)
            n = min(len(seq.tokens), budget)
            if not self._grow(seq, n):
                self._free_all(seq)
                seq.shard = seq.shard if pinned else -1
                break  # no room now; retry after some sequence finishes
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            chunks.append(Chunk(seq, 0, n))
            budget -= n
        return Schedule(chunks, preempted)

    def advance(self, chunks: Seq[Chunk]) -> None:
        """Record that the step ran: the chunks' keys/values are now cached."""
        for c in chunks:
            c.seq.num_computed = c.end

    # ---- blocks ------------------------------------------------------------------------------

    def _grow(self, seq: Sequence, num_tokens: int) -> bool:
        """Give `seq` blocks for its first `num_tokens` positions; False (holding what it had) if none left."""
        alloc = self.allocators[seq.shard]
        while len(seq.block_table) < blocks_needed(num_tokens, self.block_size):
            block = alloc.allocate()
            if block is None:
                return False
            seq.block_table.append(block)
        return True

    def _release_outside_window(self, seq: Sequence, first_query: int) -> None:
        if self.window is None:
            return
        lowest_key = first_query - self.window + 1  # no query from here on sees a position below this
        alloc = self.allocators[seq.shard]
        for j, block in enumerate(seq.block_table):
            if (j + 1) * self.block_size > lowest_key:
                break
            if block != FREED:
                alloc.free(block)
                seq.block_table[j] = FREED

    def _free_all(self, seq: Sequence) -> None:
        if seq.shard >= 0:
            alloc = self.allocators[seq.shard]
            for b in seq.block_table:
                if b != FREED:
                    alloc.free(b)
        seq.block_table = []
        seq.num_computed = 0

    def _newest_unscheduled(self, shard: int, scheduled: set[int], exclude: Sequence) -> Sequence | None:
        for seq in reversed(self.running):
            if seq.shard == shard and seq is not exclude and id(seq) not in scheduled:
                return seq
        return None

    def _preempt(self, seq: Sequence) -> None:
        logger.info("preempting %s (KV blocks exhausted on shard %d); it will be recomputed", seq.request_id, seq.shard)
        self.running.remove(seq)
        self._free_all(seq)
        seq.status = Status.WAITING
        seq.preemptions += 1
        self.num_preemptions += 1
        # Back in arrival order among the waiting, so the oldest preempted work resumes first.
        pos = next((i for i, w in enumerate(self.waiting) if w.arrival > seq.arrival), len(self.waiting))
        self.waiting.insert(pos, seq)
