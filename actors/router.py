"""Router: every layer's gate for the tokens of its attention shards, and the all-to-all
dispatch of (token, expert) rows to the expert groups and back.

Shape legend: T = tokens of this router's shards in the step, H = hidden, E = experts, K = top-k,
L = layers.

Per layer it runs the model's own `SparseMoE` (gate, routing, combine) with the exchange to the
expert groups as its experts, so its arithmetic is the single-process model's.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from actors.dispatch import router_exchange
from actors.worker import Worker
from protocol.expert_cost import TOKENS, ExpertCost, compiled_split
from protocol.experts import Placement, holders
from protocol.worker import WorkerSetup, WorkerSpec


class Router(Worker):
    def __init__(self, spec: WorkerSpec, setup: WorkerSetup) -> None:
        super().__init__(spec, setup)
        cluster = setup.config.cluster
        self.num_routers = cluster.routers
        self.num_groups = cluster.expert_groups
        self.commit_placement(setup.placement)
        self.cost = setup.expert_cost or TOKENS  # until the copy's measured one comes (`set_cost`)
        self.total_counts = torch.zeros(self.config.num_layers, self.config.num_experts, dtype=torch.long)  # [L, E]
        compiled_split()  # built or loaded now, not in the first step (the Python split serves without it)

    def commit_placement(self, placement: Placement) -> None:
        """Route by a new placement from the next step on (the engine calls it between steps)."""
        self.holders = [holders(groups, self.config.num_experts) for groups in placement]  # [L][E] -> groups

    def set_cost(self, cost: ExpertCost) -> None:
        """Split replicated experts' pairs by this cost model from the next step on."""
        self.cost = cost

    def expert_counts(self) -> torch.Tensor:
        """Tokens this router has sent to each expert, per layer, since it started: [L, E]."""
        return self.total_counts.clone()

    def run_step(self, sizes: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Run every layer's routing for this step, whose shards send `sizes` rows each (in
        `spec.shards` order); returns tokens per expert [L, E], the (token, expert) pairs it sent
        each expert group [L, G] and their seconds by the cost model [L, G]."""
        cfg, clock = self.config, self.clock
        clock.begin_step()
        counts = torch.zeros(cfg.num_layers, cfg.num_experts, dtype=torch.long, device=self.device)  # [L, E]
        self.group_tokens = torch.zeros(cfg.num_layers, self.num_groups, dtype=torch.long)  # [L, G]
        self.group_seconds = torch.zeros(cfg.num_layers, self.num_groups, dtype=torch.float64)  # [L, G]
        for i, layer in enumerate(self.model.decoder_layers()):
            with clock("shard_recv"):  # from every shard with rows, at once
                x = torch.empty(sum(sizes), cfg.hidden_size, dtype=self.dtype, device=self.device)  # [T, H]
                parts = torch.split(x, sizes)
                self.data_plane.send_recv(
                    recvs=[(r, p) for r, p in zip(self.spec.shards, parts, strict=True) if len(p)]
                )
            with clock("gating"):  # gate, top-k and combine; the exchange inside is charged to itself
                out = layer.block_sparse_moe(x, counts[i], functools.partial(self.exchange, i))  # [T, H]
            with clock("shard_send"):
                parts = torch.split(out, sizes)
                self.data_plane.send_recv(
                    sends=[(r, p) for r, p in zip(self.spec.shards, parts, strict=True) if len(p)]
                )
        step_counts = counts.cpu()  # read once per step
        self.total_counts += step_counts
        clock.end_step()
        return step_counts, self.group_tokens, self.group_seconds

    def exchange(self, layer: int, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """A layer's experts, reached over the data plane: x [T, H], ids [T, K] -> [T*K, H]."""
        with self.clock("exchange"):  # includes the expert groups' compute
            y, per_group, seconds = router_exchange(
                x, ids, self.holders[layer], self.num_routers, self.num_groups, self.data_plane, self.cost
            )
        self.group_tokens[layer] += torch.tensor(per_group)
        self.group_seconds[layer] += torch.tensor(seconds, dtype=torch.float64)
        return y

    def settings(self) -> dict[str, Any]:
        return super().settings() | {
            "holders": self.holders,
            "shards": list(self.spec.shards),
            "cost": self.cost.as_dict(),
        }
