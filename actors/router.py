"""Router: every layer's gate for the tokens of its attention shards, and the all-to-all
dispatch of (token, expert) rows to the expert groups and back.

Shape legend: T = tokens of this router's shards in the step, H = hidden, E = experts, K = top-k.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from actors.dispatch import router_exchange
from actors.worker import Worker
from cluster.placement import WorkerSpec
from cluster.protocol import StepPlan
from model.config import ModelConfig
from model.moe import combine, route


class Router(Worker):
    def __init__(
        self,
        spec: WorkerSpec,
        checkpoint: str,
        config: ModelConfig,
        dtype: torch.dtype,
        device: str,
        shard_ranks: list[int],
        group_of_expert: list[int],
        num_routers: int,
        torch_threads: int = 1,
    ) -> None:
        super().__init__(spec, checkpoint, config, dtype, device, torch_threads)
        self.shard_ranks = shard_ranks
        self.group_of = torch.tensor(group_of_expert, dtype=torch.long, device=self.device)  # [E]
        self.num_routers = num_routers
        self.num_groups = max(group_of_expert) + 1
        self.total_counts = torch.zeros(config.num_layers, config.num_experts, dtype=torch.long)  # since start

    def expert_counts(self) -> torch.Tensor:
        """Tokens this router has sent to each expert, per layer, since it started: [L, E]."""
        return self.total_counts.clone()

    @torch.inference_mode()
    def step(self, plan: StepPlan) -> torch.Tensor:
        """Run every layer's routing for this step; returns tokens per expert [L, E]."""
        cfg, clock = self.config, self.clock
        clock.begin_step()
        sizes = [plan.batches[a].num_tokens for a in self.spec.shards]
        counts = torch.zeros(cfg.num_layers, cfg.num_experts, dtype=torch.long)
        for i, gate in enumerate(self.model.gates()):
            with clock("shard_recv"):
                parts = [torch.empty(n, cfg.hidden_size, dtype=self.dtype, device=self.device) for n in sizes]
                for rank, buf in zip(self.shard_ranks, parts, strict=True):
                    if buf.shape[0]:
                        dist.recv(buf, rank)
            with clock("gating"):
                x = torch.cat(parts)  # [T, H]
                weights, experts = route(gate(x), cfg.experts_per_token)  # [T, K] each
                counts[i] += torch.bincount(experts.flatten().cpu(), minlength=cfg.num_experts)
            with clock("exchange"):  # includes the expert groups' compute
                y = router_exchange(x, experts, self.group_of, self.num_routers, self.num_groups, self.moe_group)
            with clock("gating"):
                out = combine(y, weights)  # [T, H]
            with clock("shard_send"):
                for rank, part in zip(self.shard_ranks, torch.split(out, sizes), strict=True):
                    if part.shape[0]:
                        dist.send(part.contiguous(), rank)
        self.total_counts += counts
        clock.end_step()
        return counts
