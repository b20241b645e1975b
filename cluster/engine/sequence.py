"""A sequence as the scheduler and the block manager see it: its tokens, where it runs, its blocks.

Shapes: a block table is one block id per `block_size` positions (`FREED` where a sliding window
let the block go).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from cluster.engine.block_pool import BlockKey
from model.kv_cache import FREED


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
    reuse: bool = True  # may take cached prefix blocks (not when every prompt position must be scored)
    forked: bool = False  # a choice forked from another sequence: its sampling state lives on its shard
    cached_tokens: int = 0  # prompt tokens taken from the prefix cache at its (first) admission
    keys: list[BlockKey] = field(default_factory=list)  # keys of its full blocks so far, in order
    registered: int = 0  # leading blocks offered to the cache

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    @property
    def num_blocks_held(self) -> int:
        return sum(1 for b in self.block_table if b != FREED)

    @property
    def pinned(self) -> bool:
        """Its sampling state lives on its shard: it must come back there."""
        return self.preemptions > 0 or self.forked
