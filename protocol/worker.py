"""What a worker is: its place in the copy (`WorkerSpec`) and what it is built from (`WorkerSetup`).

The engine side computes both (`cluster.backend.placement` and `cluster.backend.ray_backend`); every worker actor
takes exactly `(spec, setup)`, so a new config key reaches the workers without touching a
constructor signature.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from model.checkpoint import weight_names
from model.config import ModelConfig, Part
from protocol.config import LLMConfig
from protocol.expert_cost import ExpertCost
from protocol.experts import Placement

Role = Literal["attention", "router", "experts"]

ROLE_PARTS: dict[Role, tuple[Part, ...]] = {
    "attention": ("embed", "attention", "head"),
    "router": ("gate",),
    "experts": ("experts",),
}


@dataclass(frozen=True)
class WorkerSpec:
    role: Role
    index: int  # within its role
    rank: int  # global rank in the data-plane process group
    experts: tuple[int, ...] = ()  # expert groups: global expert ids held
    shards: tuple[int, ...] = ()  # routers: attention shards served (their index = their rank)
    router: int = -1  # attention shards: index of their router
    parts: tuple[Part, ...] = field(default=())

    @property
    def name(self) -> str:
        return f"{self.role}-{self.index}"

    def weight_names(self, config: ModelConfig) -> list[str]:
        """The checkpoint tensors this worker loads (and no other)."""
        return weight_names(config, experts=self.experts or None, parts=self.parts)


@dataclass(frozen=True)
class WorkerSetup:
    """The same for every worker of a copy: the config whole, and the tables derived from it."""

    config: LLMConfig
    model: ModelConfig  # the checkpoint's shape
    num_blocks: int  # KV blocks per attention shard
    router_ranks: tuple[int, ...]  # global rank of each router
    placement: Placement  # per layer, per expert group: the expert held in each of its slots
    expert_cost: ExpertCost | None = None  # the copy's measured cost model, once it has one (replacements)

    @property
    def moe_ranks(self) -> list[int]:
        """Ranks of the router + expert-group sub-group: routers first, then groups."""
        first = self.config.cluster.attention_shards
        return list(range(first, first + self.config.cluster.routers + self.config.cluster.expert_groups))
