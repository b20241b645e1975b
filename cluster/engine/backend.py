"""What the engine asks of a backend (`Backend`), what a step gives back (`Executed`), and the
errors that cross between them. The engine knows a backend only by this protocol; the backends
themselves are `cluster.backend`'s.

Shapes: L layers, E experts, G expert groups.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch

from protocol.expert_cost import ExpertCost
from protocol.experts import Placement
from protocol.step import Sampled, ShardBatch

Report = Literal["where", "loaded", "settings", "step_times"]


class EngineError(RuntimeError):
    """The engine cannot serve any more (a worker died, the backend failed)."""


class ShardsLost(Exception):
    """Attention shards died and were replaced: their KV caches (and their sequences' state) are gone."""

    def __init__(self, shards: list[int]) -> None:
        super().__init__(f"attention shards {shards} were replaced; their sequences must be recomputed")
        self.shards = shards


class RebalanceUnavailable(ValueError):
    """Re-placing experts needs expert groups: a single-process copy has one set of all of them."""


@dataclass
class Executed:
    """What one step on a backend gave."""

    sampled: list[list[Sampled]]  # per attention shard
    expert_counts: torch.Tensor  # [L, E] tokens routed to each expert
    group_tokens: torch.Tensor  # [L, G] (token, expert) pairs each expert group computed
    group_seconds: torch.Tensor  # [L, G] their seconds by the copy's cost model (`protocol.expert_cost`)


class ExpertWeights(Protocol):
    """The experts' weights as the balancer sees them: where they are, what moving them costs, and
    the two halves of a move (the planning is the engine's: `cluster.engine.expert_planner`)."""

    num_groups: int  # expert groups (1 in one process)
    cost: ExpertCost  # the cost model the routers split replicated experts' pairs by
    slots: list[int]  # experts each group holds

    @property
    def placement(self) -> Placement | None:
        """[layer][group] -> experts held; None where nothing can move (one process)."""
        ...

    def stage_placement(self, placement: Placement) -> int:
        """Start reading the weights each group lacks for `placement`, beside the steps; the number of
        expert weights that move."""
        ...

    def switch_placement(self) -> tuple[bool, str | None]:
        """Between steps: (done, why it was abandoned). Not done while the groups read; once they
        have, the routers and groups switch to the staged placement before the next step, unless a
        group could not read or a worker was replaced meanwhile (why: the placement stays)."""
        ...


class Backend(ExpertWeights, Protocol):
    num_shards: int

    @property
    def recoveries(self) -> list[dict[str, Any]]:
        """Workers replaced after they died, and how long each took."""
        ...

    def execute(self, batches: list[ShardBatch]) -> Executed:
        """Run one step: per shard the sampled tokens, and where its tokens went. `ShardsLost` when
        attention shards were replaced (the step did not advance)."""
        ...

    def reports(self, report: Report) -> dict[str, Any]:
        """Each worker's report, by worker name: where it runs, what it loaded, the settings it runs
        with, its step times since the last call (`LLM.profile`). Empty without workers."""
        ...

    def set_profiling(self, on: bool) -> None:
        """Start (or stop) the workers recording seconds per phase of each step."""
        ...

    def shutdown(self) -> None: ...
