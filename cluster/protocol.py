"""The one control message of a step: every worker gets the same `StepPlan` (via the object store)."""

from __future__ import annotations

from dataclasses import dataclass

from cluster.batch import ShardBatch


@dataclass
class StepPlan:
    batches: list[ShardBatch]  # one per attention shard, empty ones included; routers read their sizes
