"""A copy's workers as Ray actors: who they are (rank order), which bundle of the placement group
each has and which node it landed on, and calls to them with a deadline. The start-up phases
(`ray_startup`), the step (`ray_step`) and the recovery (`ray_recovery`) all act through it."""

from __future__ import annotations

import re
import time
from typing import Any

import ray
from ray.exceptions import RayActorError, RayError
from ray.util.placement_group import PlacementGroup, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from actors import AttentionShard, ExpertGroup, Router
from cluster.engine.backend import EngineError
from protocol.worker import Role, WorkerSetup, WorkerSpec

ACTOR_CLASSES: dict[Role, type] = {"attention": AttentionShard, "router": Router, "experts": ExpertGroup}
CALL_TIMEOUT_S = 60.0  # a call to every worker outside a step (reports, profiling)


def _remote(role: Role) -> Any:
    """The actor class of a role; expert groups read new weights in a thread of their own ("load")."""
    if role == "experts":
        return ray.remote(concurrency_groups={"load": 1})(ExpertGroup)  # type: ignore[call-overload]
    return ray.remote(ACTOR_CLASSES[role])


def error_gist(e: BaseException) -> str:
    """The gist of a Ray error: its last non-empty line (the worker's own exception, which Ray puts
    after its traceback), without colour codes."""
    text = [ln for ln in re.sub(r"\x1b\[[0-9;]*m", "", str(e)).splitlines() if ln.strip()]
    return text[-1].strip() if text else type(e).__name__


class Workers:
    """The actors of one copy in their placement group: `specs[i]` runs as `actors[i]` in bundle
    `bundle_offset + i`, on Ray node `nodes[i]` (known once it has loaded)."""

    def __init__(self, specs: list[WorkerSpec], pg: PlacementGroup, bundle_offset: int, owns_placement: bool) -> None:
        """`owns_placement`: the group was made for this copy and goes with it (a Serve replica's own
        group is left to its owner)."""
        self.specs = specs
        self.pg: PlacementGroup | None = pg
        self.bundle_offset = bundle_offset
        self.owns_placement = owns_placement
        self.actors: list[Any] = []
        self.nodes: list[str] = []

    def of_role(self, role: Role) -> list[int]:
        return [i for i, s in enumerate(self.specs) if s.role == role]

    def bundle(self, i: int) -> dict[str, float]:
        assert self.pg is not None
        return dict(self.pg.bundle_specs[self.bundle_offset + i])

    def in_bundle(self, i: int) -> PlacementGroupSchedulingStrategy:
        """Scheduling into worker `i`'s bundle (its actor, or a task beside it)."""
        assert self.pg is not None
        return PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=self.bundle_offset + i)

    def start(self, i: int, setup: WorkerSetup) -> Any:
        """Worker `i` (rank order) in its bundle of the placement group."""
        bundle = self.bundle(i)
        options: dict[str, Any] = {
            "num_cpus": bundle.get("CPU", 0),
            "num_gpus": bundle.get("GPU", 0),
            "scheduling_strategy": self.in_bundle(i),
            "max_restarts": 0,
        }
        extra = {k: v for k, v in bundle.items() if k not in ("CPU", "GPU", "memory")} or None
        if extra:
            options["resources"] = extra
        return _remote(self.specs[i].role).options(**options).remote(self.specs[i], setup)

    def get(
        self, refs: list[Any], timeout_s: float, what: str, workers: list[int] | None = None, hint: str = ""
    ) -> list[Any]:
        """Results of one call per worker (`workers`: whose, by rank; default all, in order); the first
        failure or the timeout ends the copy and raises (with `hint`: what to do about a timeout)."""
        names = [self.specs[i].name for i in (workers if workers is not None else range(len(refs)))]
        pending = list(refs)
        deadline = time.monotonic() + timeout_s
        while pending:
            left = deadline - time.monotonic()
            ready, pending = ray.wait(pending, num_returns=1, timeout=max(left, 0.0))
            if not ready:
                slow = [names[refs.index(r)] for r in pending]
                self.shutdown()
                raise EngineError(f"{what} timed out after {timeout_s:.0f} s waiting for {', '.join(slow)}"
                                  + (f"; {hint}" if hint else ""))  # fmt: skip
            try:
                ray.get(ready[0])
            except (RayActorError, RayError) as e:
                name = names[refs.index(ready[0])]
                self.shutdown()
                kind = "died" if isinstance(e, RayActorError) else "failed"
                raise EngineError(f"worker {name} {kind} during {what}: {error_gist(e)}") from e
        return ray.get(refs)

    def call(
        self, method: str, workers: list[int], *args: Any, timeout_s: float = CALL_TIMEOUT_S, what: str = ""
    ) -> list[Any]:
        """`method(*args)` on each of `workers`, their results in that order (`get`'s failures, named
        `what`: the method's name by default)."""
        refs = [getattr(self.actors[i], method).remote(*args) for i in workers]
        return self.get(refs, timeout_s, what or method, workers=workers)

    def call_all(self, method: str, *args: Any, timeout_s: float = CALL_TIMEOUT_S) -> list[Any]:
        return self.call(method, list(range(len(self.actors))), *args, timeout_s=timeout_s)

    def room_for(self, workers: list[int]) -> bool:
        """Whether the cluster's free resources could hold these workers' bundles again (their sum: a
        necessary condition, so False means they cannot all be placed)."""
        free = ray.available_resources()  # type: ignore[no-untyped-call]
        need: dict[str, float] = {}
        for i in workers:
            for k, v in self.bundle(i).items():
                need[k] = need.get(k, 0.0) + v
        return all(free.get(k, 0.0) >= v for k, v in need.items() if v > 0)

    def bundle_placed(self, i: int, table: dict[str, Any]) -> bool:
        """Whether worker `i`'s bundle is on a live node in `table` (`placement_group_table`)."""
        node = table.get("bundles_to_node_id", {}).get(self.bundle_offset + i)
        return node in {n["NodeID"] for n in ray.nodes() if n["Alive"]}  # type: ignore[no-untyped-call]

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
