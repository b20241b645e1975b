"""RayBackend: one model copy as Ray actors in a placement group, stepped once per iteration.

It composes the rooms of a copy on Ray: joining Ray (`ray_connect`), the workers and calls to them
(`ray_workers`), starting the copy in phases (`ray_startup`), one step with failure detection
(`ray_step`) and the fault policy that replaces dead workers or gives the copy up (`ray_recovery`).
What is left here: the engine's `Backend` protocol over them, and staging and switching the experts'
weights for a placement the engine's planner chose.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, NamedTuple

import ray
import torch
from ray.exceptions import RayError
from ray.util.placement_group import PlacementGroup

from actors.expert_group import moves_to
from cluster.backend.placement import Layout, check_memory, check_transport, slots_per_group, worker_specs
from cluster.backend.ray_recovery import MAX_RECOVERIES, Recovery
from cluster.backend.ray_startup import reserve, start_copy
from cluster.backend.ray_step import step_everywhere
from cluster.backend.ray_workers import error_gist
from cluster.engine.backend import EngineError, Executed, Report, ShardsLost
from protocol.experts import Placement
from protocol.step import ShardBatch, step_messages
from protocol.worker import WorkerSetup

logger = logging.getLogger(__name__)


class _Staging(NamedTuple):
    """A re-placement under way: the placement, the groups' reads, its number, and how many workers
    had been replaced when it began."""

    placement: Placement
    refs: list[Any]
    number: int
    recoveries: int


class RayBackend:
    def __init__(
        self,
        setup: WorkerSetup,
        ray_address: str | None = None,
        placement: PlacementGroup | None = None,
        bundle_offset: int = 0,
    ) -> None:
        """`placement`: an existing group to start the workers in (a Serve replica's, whose bundle 0
        is the replica itself: `bundle_offset=1`); it is left to its owner at shutdown."""
        cfg = setup.config
        self.layout = Layout.of(cfg.cluster)
        self.num_shards = self.layout.attention_shards
        self.num_groups = self.layout.expert_groups
        self.step_timeout_s = cfg.engine.step_timeout_s
        self.slots = slots_per_group(setup.model.num_experts, self.num_groups, self.layout.redundant_experts)
        self.placement: Placement = setup.placement
        self._staging: _Staging | None = None
        self._replacements = 0  # re-placements begun: each one's staged weights go by its number
        specs = worker_specs(self.layout, setup.model.num_experts)
        check_transport(cfg.cluster)
        if cfg.cluster.device == "cuda":
            check_memory(setup.model, specs, cfg.dtype.itemsize, int(cfg.cluster.gpu_memory_gb * 1e9))
        self.workers = reserve(setup, specs, ray_address, placement, bundle_offset)
        self.recovery = Recovery(self.workers, self.step_timeout_s, cfg.cluster.placement_timeout_s)
        try:
            self.cost = start_copy(self.workers, setup, self.layout)
        except BaseException:
            self.shutdown()
            raise
        self.setup = dataclasses.replace(setup, expert_cost=self.cost)  # replacements start with it
        logger.info("model copy up: %s", ", ".join(s.name for s in specs))

    @property
    def recoveries(self) -> list[dict[str, Any]]:
        """Workers replaced after they died, and how long each took."""
        return self.recovery.records

    # ---- steps -------------------------------------------------------------------------------

    def execute(self, batches: list[ShardBatch]) -> Executed:
        """One step on every worker. A worker that dies is replaced and the step run again
        (`ray_recovery`): no request fails for a lost router or expert group. A lost attention shard's
        KV cache is gone with it: `ShardsLost` tells the engine to recompute its sequences."""
        messages = step_messages(batches, self.workers.specs)
        timeouts = (self.step_timeout_s, self.setup.config.cluster.data_plane_timeout_s)
        for _ in range(MAX_RECOVERIES + 1):
            outcome = step_everywhere(self.workers, messages, self.recovery, *timeouts)
            if not outcome.dead and not outcome.errors:
                return self._executed(outcome.results)
            replaced = self.recovery.after_failure(outcome, dataclasses.replace(self.setup, placement=self.placement))
            lost = [self.workers.specs[i].index for i in replaced if self.workers.specs[i].role == "attention"]
            if lost:
                raise ShardsLost(lost)
            a, r = self.layout.attention_shards, self.layout.routers
            if all(res is not None for res in outcome.results[: a + r]):  # it died after the step's last exchange
                return self._executed(outcome.results)
        self.shutdown()
        raise EngineError(f"the step failed {MAX_RECOVERIES + 1} times: workers kept dying")

    def _executed(self, results: list[Any]) -> Executed:
        a, r = self.layout.attention_shards, self.layout.routers
        routed = results[a : a + r]  # each router's (tokens per expert [L, E], pairs per group [L, G])
        counts = torch.stack([c for c, _, _ in routed]).sum(0)
        groups = torch.stack([g for _, g, _ in routed]).sum(0)
        seconds = torch.stack([s for _, _, s in routed]).sum(0)
        return Executed(results[:a], counts, groups, seconds)

    # ---- the experts' weights ----------------------------------------------------------------

    def stage_placement(self, placement: Placement) -> int:
        """Each group starts reading the weights of the experts `placement` gives it that it lacks,
        from the checkpoint, beside its steps (`switch_placement` switches to it between steps); the
        number of expert weights that move."""
        if self._staging is not None:
            raise RuntimeError("a re-placement is already under way")
        refs, moved = [], 0
        self._replacements += 1
        for i in self.workers.of_role("experts"):
            g = self.workers.specs[i].index
            moves = moves_to([list(groups[g]) for groups in self.placement], placement, g)
            moved += sum(len(by_slot) for by_slot in moves.values())
            if moves:
                refs.append(self.workers.actors[i].stage.remote(moves, self._replacements))
        self._staging = _Staging(placement, refs, self._replacements, len(self.recoveries))
        return moved

    def switch_placement(self) -> tuple[bool, str | None]:
        """Between steps: once every group has read its new weights, switch the routers and groups to
        the staged placement (queued before the next step): (True, None); (False, None) while they
        read. Abandoned, (True, why), if a group could not read them or a worker was replaced meanwhile
        (it started with the old placement)."""
        staging = self._staging
        if staging is None:
            return True, None
        ready, _ = ray.wait(staging.refs, num_returns=len(staging.refs), timeout=0)
        if len(ready) < len(staging.refs):
            return False, None
        self._staging = None
        why = None
        try:
            ray.get(staging.refs)
        except RayError as e:
            why = f"a group could not read its new weights ({error_gist(e)})"
        if why is None and len(self.recoveries) != staging.recoveries:
            why = "a worker was replaced while the weights moved (it holds the placement it started with)"
        for spec, actor in zip(self.workers.specs, self.workers.actors, strict=True):  # queued before the next step
            if spec.role == "router" and why is None:
                actor.commit_placement.remote(staging.placement)
            elif spec.role == "experts":
                (actor.drop if why else actor.commit).remote(staging.number)
        if why is None:
            self.placement = staging.placement
        return True, why

    # ---- reports and shutdown ----------------------------------------------------------------

    def reports(self, report: Report) -> dict[str, Any]:
        """Each worker's report (`where`, `loaded`, `settings`, `step_times`), by worker name, in rank order."""
        return dict(zip((s.name for s in self.workers.specs), self.workers.call_all(report), strict=True))

    def set_profiling(self, on: bool) -> None:
        self.workers.call_all("profile", on)

    def shutdown(self) -> None:
        self.workers.shutdown()
