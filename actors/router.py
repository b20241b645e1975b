"""Router: every layer's gate for the tokens of its attention shards, and the all-to-all
dispatch of (token, expert) rows to the expert groups and back.

Shape legend: T = tokens of this router's shards in the step, H = hidden, E = experts, K = top-k,
L = layers.

Per layer it runs the model's own `SparseMoE` (gate, routing, combine) with the exchange to the
expert groups as its experts, so its arithmetic is the single-process model's.
"""

from __future__ import annotations

from typing import Any

import torch

from actors.dispatch import router_exchange
from actors.worker import Worker
from protocol.step import StepPlan
from protocol.worker import WorkerSetup, WorkerSpec


class Router(Worker):
    def __init__(self, spec: WorkerSpec, setup: WorkerSetup) -> None:
        super().__init__(spec, setup)
        cluster = setup.config.cluster
        self.group_of = torch.tensor(setup.group_of_expert, dtype=torch.long, device=self.device)  # [E]
        self.num_routers = cluster.routers
        self.num_groups = cluster.expert_groups
        self.total_counts = torch.zeros(self.config.num_layers, self.config.num_experts, dtype=torch.long)  # [L, E]

    def expert_counts(self) -> torch.Tensor:
        """Tokens this router has sent to each expert, per layer, since it started: [L, E]."""
        return self.total_counts.clone()

    @torch.inference_mode()
    def step(self, plan: StepPlan) -> torch.Tensor:
        """Run every layer's routing for this step; returns tokens per expert [L, E]."""
        cfg, clock = self.config, self.clock
        clock.begin_step()
        sizes = [plan.batches[a].num_tokens for a in self.spec.shards]
        counts = torch.zeros(cfg.num_layers, cfg.num_experts, dtype=torch.long, device=self.device)  # [L, E]
        for i, layer in enumerate(self.model.decoder_layers()):
            with clock("shard_recv"):  # from every shard with rows, at once
                x = torch.empty(sum(sizes), cfg.hidden_size, dtype=self.dtype, device=self.device)  # [T, H]
                parts = torch.split(x, sizes)
                self.data_plane.send_recv(
                    recvs=[(r, p) for r, p in zip(self.spec.shards, parts, strict=True) if len(p)]
                )
            with clock("gating"):  # gate, top-k and combine; the exchange inside is charged to itself
                out = layer.block_sparse_moe(x, counts[i], self.exchange)  # [T, H]
            with clock("shard_send"):
                parts = torch.split(out, sizes)
                self.data_plane.send_recv(
                    sends=[(r, p) for r, p in zip(self.spec.shards, parts, strict=True) if len(p)]
                )
        step_counts = counts.cpu()  # read once per step
        self.total_counts += step_counts
        clock.end_step()
        return step_counts

    def exchange(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The experts of a layer, reached over the data plane: x [T, H], ids [T, K] -> [T*K, H]."""
        with self.clock("exchange"):  # includes the expert groups' compute
            return router_exchange(x, ids, self.group_of, self.num_routers, self.num_groups, self.data_plane)

    def settings(self) -> dict[str, Any]:
        return super().settings() | {"group_of_expert": self.group_of.tolist(), "shards": list(self.spec.shards)}
