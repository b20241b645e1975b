"""ExpertGroup: the SwiGLU weights of its experts for every layer, run on the rows routers send.

Shape legend: N = rows received in a layer, H = hidden.
"""

from __future__ import annotations

import torch

from actors.dispatch import MAX_EXPERTS_IN_COLUMN, group_exchange
from actors.worker import Worker
from model.moe import ExpertFFN
from protocol.step import StepPlan
from protocol.worker import WorkerSetup, WorkerSpec


class ExpertGroup(Worker):
    def __init__(self, spec: WorkerSpec, setup: WorkerSetup) -> None:
        config = setup.model
        if config.num_experts > MAX_EXPERTS_IN_COLUMN:
            raise ValueError(f"at most {MAX_EXPERTS_IN_COLUMN} experts are supported, got {config.num_experts}")
        super().__init__(spec, setup)
        self.num_routers = setup.config.cluster.routers
        self.num_groups = setup.config.cluster.expert_groups
        local = torch.full((config.num_experts,), -1, dtype=torch.long, device=self.device)
        local[list(spec.experts)] = torch.arange(len(spec.experts), device=self.device)
        self.local_of = local  # [E] global expert id -> slot here (-1: not ours)

    @torch.inference_mode()
    def step(self, plan: StepPlan) -> int:
        """Serve every layer of this step; returns the rows processed."""
        cfg, clock = self.config, self.clock
        clock.begin_step()
        total = 0
        misrouted = torch.zeros((), dtype=torch.bool, device=self.device)  # read once, after the layers
        for ffn in self.model.expert_ffns():

            def compute(x: torch.Tensor, expert_ids: torch.Tensor, ffn: ExpertFFN = ffn) -> torch.Tensor:
                with clock("expert_ffn"):
                    local = self.local_of[expert_ids]  # [N]
                    misrouted.logical_or_(local.lt(0).any())
                    return ffn(x, local.clamp(min=0))

            with clock("exchange"):  # the wires; expert_ffn inside is charged to itself
                total += group_exchange(
                    cfg.hidden_size, self.dtype, self.device, self.num_routers, self.num_groups, self.data_plane,
                    compute,
                )  # fmt: skip
        if bool(misrouted):
            raise RuntimeError(f"{self.spec.name} received rows for an expert it does not hold")
        clock.end_step()
        return total
