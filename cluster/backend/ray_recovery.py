"""The fault policy of a copy on Ray: what a failed step means, what a worker's host is doing, and
whether to replace the dead workers or give the copy up.

- A worker that dies is replaced in its bundle (after a node loss, once Ray has placed the bundle
  again), the data plane is formed anew among all workers, and the step runs again: no request
  fails for a lost router or expert group. A worker's process outlives its killed raylet for a
  moment, so the other workers on a dead worker's host that has lost its Ray are replaced with it.
- A host that has lost its Ray ("gone") is waited for until Ray calls it dead (`DEAD_VERDICT_S`),
  unless the cluster has no room to place its workers again: then waiting would only delay the
  503s, and the copy is given up at once.
- A host that does not answer at all ("unreachable": partitioned, powered off) cannot have its
  bundles moved while Ray holds it alive, so the copy is given up (`EngineError`: its requests get
  503 and Serve starts a copy on what is left).
- Any other failure of a worker's own, or a replacement that cannot start in time, gives the copy up.

How long a step may wait for each of these is `ray_step`'s; the figures are in RELIABILITY.md.
"""

from __future__ import annotations

import dataclasses
import logging
import socket
import time
from typing import Any, Literal

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayError

from cluster.backend.ray_startup import STARTUP_TIMEOUT_S, form_data_plane
from cluster.backend.ray_workers import Workers, error_gist
from cluster.engine.backend import EngineError
from protocol.worker import WorkerSetup

logger = logging.getLogger(__name__)

MAX_RECOVERIES = 2  # worker replacements one step may need before the copy is given up
UNREACHABLE_GRACE_S = 5.0  # once a worker's step failed, how long the others may take to answer
NO_ROOM_CONFIRM_S = 2.0  # a lost bundle with no free room for this long is taken as unplaceable
DEAD_VERDICT_S = 30.0  # a silent worker whose host's raylet refuses: how long Ray may take to call it dead

HostState = Literal["up", "gone", "unreachable", "unknown"]


def host_state(node_id: str, known: list[dict[str, Any]]) -> HostState:
    """The host of Ray node `node_id` (looked up in `known`, `ray.nodes()`): "gone" when it has lost
    its Ray (Ray already calls it dead, or the host answers but its raylet's port refuses: its Ray
    processes died, and Ray's health checks will call it dead), "unreachable" when it does not
    answer at all (partitioned, powered off), "up" when its raylet answers."""
    node = next((n for n in known if n["NodeID"] == node_id), None)
    if node is None:
        return "unknown"
    if not node["Alive"]:
        return "gone"
    try:
        with socket.create_connection((node["NodeManagerAddress"], int(node["NodeManagerPort"])), timeout=1.0):
            return "up"
    except ConnectionRefusedError:
        return "gone"
    except OSError:  # timed out, no route
        return "unreachable"


@dataclasses.dataclass
class StepOutcome:
    """Each worker's result of a step (None where it failed), the dead workers, and the failures that
    were not a dead peer (by worker name)."""

    results: list[Any]
    dead: list[int]
    errors: dict[str, BaseException]


class Recovery:
    """Replaces a copy's dead workers, or gives the copy up; keeps the record of replacements."""

    def __init__(self, workers: Workers, step_timeout_s: float, placement_timeout_s: float) -> None:
        self.workers = workers
        self.step_timeout_s = step_timeout_s
        self.placement_timeout_s = placement_timeout_s
        self.records: list[dict[str, Any]] = []  # workers replaced, and how long it took

    def host_states(self, workers: list[int]) -> dict[int, HostState]:
        """Each worker's host's state, by worker (one look at Ray's nodes, one probe per host)."""
        known = ray.nodes()  # type: ignore[no-untyped-call]
        states = {n: host_state(n, known) for n in {self.workers.nodes[i] for i in workers}}
        return {i: states[self.workers.nodes[i]] for i in workers}

    def no_room_before_verdict(self, workers: list[int]) -> bool:
        """Whether the cluster has no room for these workers' bundles while Ray still holds their hosts
        alive. The free resources first, Ray's verdict after: once Ray calls a host dead it places the
        lost bundles again at once, reserving their room on the nodes left, which then no longer shows
        as free. Still alive after the read: nothing was reserved before it, so the free resources are
        all there is."""
        if self.workers.room_for(workers):
            return False
        alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}  # type: ignore[no-untyped-call]
        return all(self.workers.nodes[i] in alive for i in workers)

    def after_failure(self, outcome: StepOutcome, setup: WorkerSetup) -> list[int]:
        """A step failed: replace its dead workers (and those going with them) and return them, or give
        the copy up (`EngineError`) where a worker failed by itself, not for a lost peer."""
        if outcome.errors or not outcome.dead:
            name, error = next(iter(outcome.errors.items()))
            self.workers.shutdown()
            raise EngineError(f"worker {name} failed during step: {error_gist(error)}") from error
        dead = outcome.dead + self._going_with(outcome.dead)
        self._replace(dead, setup)
        return dead

    def _going_with(self, dead: list[int]) -> list[int]:
        """The other workers on the hosts of the `dead` ones where that host has lost its Ray: such a
        worker's process outlives its raylet for a moment, so it may have failed the step as a survivor
        (`DataPlaneBroken`) rather than as dead, and it dies when Ray calls the host dead, perhaps
        while the data plane forms anew. Replaced with the dead ones instead."""
        gone = {self.workers.nodes[i] for i, state in self.host_states(dead).items() if state == "gone"}
        going = [i for i, node in enumerate(self.workers.nodes) if i not in dead and node in gone]
        if going:
            logger.warning("worker %s shares a lost host with a dead worker; replacing it too",
                           ", ".join(self.workers.specs[i].name for i in going))  # fmt: skip
        return going

    def _replace(self, dead: list[int], setup: WorkerSetup) -> None:
        """Replace the dead workers in their bundles (built from `setup`: the copy's current expert
        placement) and form the data plane anew among all workers; the others keep their weights and
        KV caches. If that cannot be done, the copy is given up: shut down, `EngineError` (Serve then
        replaces it)."""
        names = ", ".join(self.workers.specs[i].name for i in dead)
        logger.warning("worker %s died; replacing it", names)
        started = time.monotonic()
        try:
            # In-flight requests wait on this: bounded by the step's deadline, not the (long) first placement's.
            deadline = time.monotonic() + min(self.placement_timeout_s, self.step_timeout_s)
            for i in dead:
                self.workers.actors[i] = self._restart(i, setup, deadline)
            form_data_plane(self.workers, timeout_s=max(self.step_timeout_s, STARTUP_TIMEOUT_S))
        except (EngineError, RayError) as e:
            self.workers.shutdown()
            raise EngineError(f"worker {names} died and could not be replaced: {error_gist(e)}") from e
        self.records.append({"workers": names, "seconds": time.monotonic() - started})
        logger.warning("worker %s replaced in %.1f s; the data plane is formed anew", names, time.monotonic() - started)

    def _restart(self, i: int, setup: WorkerSetup, deadline: float) -> Any:
        """A new worker `i`, started once its bundle is placed again. When a whole node was lost, Ray
        first notices, then places the node's bundles elsewhere if there is room; a worker started
        before that is cancelled, and is started again."""
        workers, name = self.workers, self.workers.specs[i].name
        assert workers.pg is not None
        pg_id = workers.pg.id.hex()
        no_room_since: float | None = None
        # Nothing starts in the bundle of a host that lost its Ray until Ray calls it dead, which can
        # take long; where there is no room to place it again anyway, waiting only delays the 503s.
        if self.host_states([i])[i] == "gone" and self.no_room_before_verdict([i]):
            raise EngineError(f"the host of worker {name} lost its Ray and there is no room left to place it "
                              "again: the copy is given up")  # fmt: skip
        while True:
            while (table := ray.util.placement_group_table(workers.pg)).get("state") != "CREATED":
                now = time.monotonic()
                if now > deadline:
                    raise EngineError(f"the placement group {pg_id} was not placed again in time")
                # A bundle Ray has already given a live node is on its way (its resources are reserved
                # there, so they no longer show as free): only an unplaced one can lack room.
                no_room = (table.get("state") == "RESCHEDULING" and not workers.bundle_placed(i, table)
                           and not workers.room_for([i]))  # fmt: skip
                no_room_since = (no_room_since or now) if no_room else None
                if no_room_since is not None and now - no_room_since > NO_ROOM_CONFIRM_S:
                    raise EngineError(f"no room left on the cluster to place {name} again "
                                      f"(it needs {workers.bundle(i)} free)")  # fmt: skip
                time.sleep(0.2)
            actor = workers.start(i, setup)
            try:
                where = ray.get(actor.where.remote(), timeout=max(deadline - time.monotonic(), 1.0))
                workers.nodes[i] = where["node_id"]
                return actor
            except RayActorError as e:
                cancelled = "never ran" in str(e) or "cancelled" in str(e)
                if not cancelled or time.monotonic() > deadline:
                    raise
                logger.info("worker %s was cancelled before it ran (its bundle moves); starting it again", name)
                time.sleep(0.5)
            except GetTimeoutError as e:
                ray.kill(actor, no_restart=True)
                raise EngineError(f"{name} did not start in time") from e
