"""RayBackend: one model copy as Ray actors in a placement group, stepped once per iteration.

Start-up: check the plan fits the cluster, reserve a placement group (waiting with a timeout,
never silently), start one actor per bundle (each loads only its own tensors), then form the
`torch.distributed` data plane from rank 0's address. A step is one `step(plan)` call per worker;
if any worker dies or the step outlives its timeout, every worker is killed (the survivors may
be blocked in a collective) and the error names the worker.
"""

from __future__ import annotations

import logging
import os
import re
import time
from pathlib import Path
from typing import Any

import ray
import torch
from ray.exceptions import GetTimeoutError, RayActorError, RayError
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from actors import AttentionShard, ExpertGroup, Router
from cluster.batch import Sampled, ShardBatch
from cluster.engine import EngineError
from cluster.placement import (
    Layout,
    PlacementError,
    Strategy,
    bundles,
    check_memory,
    check_resources,
    worker_specs,
)
from cluster.placement import worker_resources as default_worker_resources
from cluster.protocol import StepPlan
from model.config import ModelConfig

logger = logging.getLogger(__name__)


def ensure_ray(address: str | None, cpus_needed: float) -> None:
    """Connect to `address`, or start a local Ray instance big enough for the plan's CPU slots."""
    if ray.is_initialized():
        return
    if address is None:
        # Local mode: logical CPU slots may exceed the cores (it is for correctness, not speed).
        cpus = max(os.cpu_count() or 1, int(cpus_needed) + 2)
        ray.init(address="local", num_cpus=cpus, include_dashboard=False, logging_level=logging.WARNING)
    else:
        ray.init(address=address, logging_level=logging.WARNING)


def available_nodes() -> list[dict[str, float]]:
    """Resources of each alive node (totals: a fresh placement group competes for them)."""
    return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]  # type: ignore[no-untyped-call]


class RayBackend:
    def __init__(
        self,
        checkpoint: Path,
        config: ModelConfig,
        layout: Layout,
        device: str,
        dtype: torch.dtype,
        num_blocks: int,
        block_size: int,
        ray_address: str | None = None,
        strategy: str = "PACK",
        placement_timeout_s: float = 120.0,
        worker_resources: dict[str, float] | None = None,
        torch_threads: int = 1,
        step_timeout_s: float = 300.0,
        device_memory_bytes: int = 80 * 10**9,
        placement: PlacementGroup | None = None,
        bundle_offset: int = 0,
    ) -> None:
        """`placement`: an existing group to start the workers in (a Serve replica's, whose bundle 0
        is the replica itself: `bundle_offset=1`); it is left to its owner at shutdown."""
        self.layout = layout
        self.num_shards = layout.attention_shards
        self.step_timeout_s = step_timeout_s
        self.specs = worker_specs(layout, config.num_experts)
        resources = worker_resources or default_worker_resources(device)
        wanted = bundles(self.specs, resources)
        if device == "cuda":
            itemsize = torch.empty((), dtype=dtype).element_size()
            check_memory(config, self.specs, itemsize, device_memory_bytes)
        self.bundle_offset = bundle_offset
        self.owns_placement = placement is None
        self.actors: list[Any] = []
        if placement is None:
            ensure_ray(ray_address, sum(b.get("CPU", 0.0) for b in wanted))
            if strategy not in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"):
                raise PlacementError(
                    f"placement strategy must be PACK, SPREAD, STRICT_PACK or STRICT_SPREAD: {strategy}"
                )
            strat: Strategy = strategy  # type: ignore[assignment]
            check_resources(wanted, available_nodes(), strat)
            placement = placement_group(wanted, strategy=strat)
        elif len(placement.bundle_specs) < bundle_offset + len(self.specs):
            raise PlacementError(
                f"the placement group has {len(placement.bundle_specs)} bundles; this layout needs "
                f"{bundle_offset + len(self.specs)} ({bundle_offset} before the workers)"
            )
        self.pg: PlacementGroup | None = placement
        try:
            self._wait_placement(placement_timeout_s, len(wanted))
            self.actors = self._start_actors(checkpoint, config, device, dtype, num_blocks, block_size, torch_threads)
            self._form_data_plane(timeout_s=max(step_timeout_s, 60.0))
        except BaseException:
            self.shutdown()
            raise
        logger.info("model copy up: %s", ", ".join(s.name for s in self.specs))

    # ---- start-up ----------------------------------------------------------------------------

    def _wait_placement(self, timeout_s: float, n: int) -> None:
        assert self.pg is not None
        try:
            ray.get(self.pg.ready(), timeout=timeout_s)
        except GetTimeoutError as e:
            free = {
                k: v
                for k, v in ray.available_resources().items()  # type: ignore[no-untyped-call]
                if k in ("CPU", "GPU") or not (k.startswith(("bundle_group", "node:")) or "memory" in k)
            }
            raise PlacementError(
                f"the placement group of {n} bundles ({self.pg.bundle_specs[0]} each) was not placed within "
                f"{timeout_s:.0f} s; the cluster has {free} free. Add nodes or shrink the layout."
            ) from e

    def _start_actors(
        self,
        checkpoint: Path,
        config: ModelConfig,
        device: str,
        dtype: torch.dtype,
        num_blocks: int,
        block_size: int,
        torch_threads: int,
    ) -> list[Any]:
        lay = self.layout
        router_ranks = [s.rank for s in self.specs if s.role == "router"]
        group_of = [0] * config.num_experts
        for s in self.specs:
            for e in s.experts:
                group_of[e] = s.index
        assert self.pg is not None
        actors: list[Any] = []
        for i, spec in enumerate(self.specs):
            common = (spec, str(checkpoint), config, dtype, device)
            if spec.role == "attention":
                cls: type = AttentionShard
                args: tuple[Any, ...] = (*common, router_ranks[spec.router], num_blocks, block_size, torch_threads)
            elif spec.role == "router":
                cls, args = Router, (*common, list(spec.shards), group_of, lay.routers, torch_threads)
            else:
                cls, args = ExpertGroup, (*common, lay.routers, lay.expert_groups, torch_threads)
            index = self.bundle_offset + i
            bundle = self.pg.bundle_specs[index]
            options: dict[str, Any] = {
                "num_cpus": bundle.get("CPU", 0),
                "num_gpus": bundle.get("GPU", 0),
                "scheduling_strategy": PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=index),
                "max_restarts": 0,
            }
            extra = {k: v for k, v in bundle.items() if k not in ("CPU", "GPU", "memory")} or None
            if extra:
                options["resources"] = extra
            actors.append(ray.remote(cls).options(**options).remote(*args))
        return actors

    def _form_data_plane(self, timeout_s: float) -> None:
        world = len(self.actors)
        moe_ranks = [s.rank for s in self.specs if s.role != "attention"]
        addr, port = self._get([self.actors[0].address.remote()], timeout_s, "start-up")[0]
        self._get([a.join.remote(addr, port, world, moe_ranks, timeout_s) for a in self.actors], timeout_s, "start-up")

    # ---- steps -------------------------------------------------------------------------------

    def execute(self, batches: list[ShardBatch]) -> tuple[list[list[Sampled]], torch.Tensor]:
        plan = ray.put(StepPlan(batches))
        results = self._get([a.step.remote(plan) for a in self.actors], self.step_timeout_s, "step")
        a, r = self.layout.attention_shards, self.layout.routers
        counts = torch.stack(results[a : a + r]).sum(0)
        return results[:a], counts

    def _get(self, refs: list[Any], timeout_s: float, what: str) -> list[Any]:
        """Results of one call per worker; the first failure or the timeout kills the copy and raises."""
        pending = list(refs)
        deadline = time.monotonic() + timeout_s
        while pending:
            left = deadline - time.monotonic()
            ready, pending = ray.wait(pending, num_returns=1, timeout=max(left, 0.0))
            if not ready:
                slow = [self.specs[refs.index(r)].name for r in pending]
                self.shutdown()
                raise EngineError(f"{what} timed out after {timeout_s:.0f} s waiting for {', '.join(slow)}")
            try:
                ray.get(ready[0])
            except (RayActorError, RayError) as e:
                name = self.specs[refs.index(ready[0])].name
                self.shutdown()
                kind = "died" if isinstance(e, RayActorError) else "failed"
                raise EngineError(f"worker {name} {kind} during {what}: {_first_line(e)}") from e
        return ray.get(refs)

    # ---- reports and shutdown ----------------------------------------------------------------

    def call_all(self, method: str, *args: Any, timeout_s: float = 60.0) -> list[Any]:
        """Call a report method (`where`, `loaded`, `profile`, `step_times`, ...) on every worker, in rank order."""
        return self._get([getattr(a, method).remote(*args) for a in self.actors], timeout_s, method)

    def shutdown(self) -> None:
        for a in self.actors:
            try:
                ray.kill(a, no_restart=True)
            except Exception:  # already gone
                pass
        self.actors = []
        if self.pg is not None and self.owns_placement:
            try:
                remove_placement_group(self.pg)
            except Exception:
                pass
            self.pg = None


def _first_line(e: BaseException) -> str:
    """The gist of a Ray error: its last non-empty line (the worker's exception), without colour codes."""
    text = [ln for ln in re.sub(r"\x1b\[[0-9;]*m", "", str(e)).splitlines() if ln.strip()]
    return text[-1].strip() if text else type(e).__name__
