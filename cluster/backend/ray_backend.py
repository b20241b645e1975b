"""RayBackend: one model copy as Ray actors in a placement group, stepped once per iteration.

Start-up, in phases, each with its own deadline and a timeout that names it and what to do:
placement (reserve the placement group), kernels (build the compiled CPU kernels once on each
host that runs a worker, before any worker's deadline starts), loading (one actor per bundle,
each reads only its own tensors), data plane (the `torch.distributed` group from rank 0's
address, on the interface that carries each node's Ray IP). A step is one `step` call per
worker, each with its own part (`protocol.step.step_messages`); a worker that dies is replaced
alone (`_recover`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import socket
import statistics
import time
from typing import Any, Literal, NamedTuple

import ray
import torch
from ray.exceptions import AuthenticationError, GetTimeoutError, RayActorError, RayError
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from actors import AttentionShard, ExpertGroup, Router
from actors.data_plane import DataPlaneBroken
from actors.expert_group import moves_to
from cluster.backend.placement import (
    Layout,
    PlacementError,
    bundles,
    check_memory,
    check_resources,
    check_transport,
    checked_placement,
    plan_placement,
    predict_steps,
    slots_per_group,
    worker_resources,
    worker_specs,
)
from cluster.engine.core import EngineError, Executed, Report, ShardsLost
from cluster.engine.expert_balancer import RecordedStep, layer_imbalance
from protocol.expert_cost import ExpertCost, compiled_split
from protocol.experts import AnyPlacement, Placement
from protocol.step import ShardBatch, StepMessage, step_messages
from protocol.worker import Role, WorkerSetup

ACTOR_CLASSES: dict[Role, type] = {"attention": AttentionShard, "router": Router, "experts": ExpertGroup}
MAX_RECOVERIES = 2  # worker replacements one step may need before the copy is given up


def _remote(role: Role) -> Any:
    """The actor class of a role; expert groups read new weights in a thread of their own ("load")."""
    if role == "experts":
        return ray.remote(concurrency_groups={"load": 1})(ExpertGroup)  # type: ignore[call-overload]
    return ray.remote(ACTOR_CLASSES[role])


logger = logging.getLogger(__name__)


KERNEL_BUILD_TIMEOUT_S = 900.0  # compiling the CPU kernels on a fresh host (~20 s on 2 cores; slow disks more)
STARTUP_TIMEOUT_S = 60.0  # the least any start-up phase after placement waits
UNREACHABLE_GRACE_S = 5.0  # once a worker's step failed, how long the others may take to answer
NO_ROOM_CONFIRM_S = 2.0  # a lost bundle with no free room for this long is taken as unplaceable
DEAD_VERDICT_S = 30.0  # a silent worker whose host's raylet refuses: how long Ray may take to call it dead


class RayRefused(ConnectionError):
    """The Ray cluster refused this process (token authentication)."""


def connect_ray(address: str) -> None:
    """Join the Ray cluster at `address`; `RayRefused` naming the fix when its token authentication
    turns this process away (Ray retries for ~20 s first, then says so)."""
    try:
        ray.init(address=address, logging_level=logging.WARNING)
    except ConnectionError as e:
        if not _refused_for_auth(e):
            raise
        mode = os.environ.get("RAY_AUTH_MODE")
        why = "sent a token it does not accept" if mode == "token" else f"has RAY_AUTH_MODE={mode or '(unset)'}"
        raise RayRefused(
            f"the Ray cluster at {address} refused this process: it runs with token authentication and this "
            f"process {why}. "
            "Set RAY_AUTH_MODE=token and the cluster's token (RAY_AUTH_TOKEN, or the file ~/.ray/auth_token; "
            "`ray get-auth-token` on the head prints it) on every node and driver."
        ) from e


def _refused_for_auth(e: BaseException | None) -> bool:
    """Whether a failure to connect was token authentication turning this process away."""
    seen = 0
    while e is not None and seen < 10:
        if isinstance(e, AuthenticationError) or "InvalidAuthToken" in str(e):
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False


def ensure_ray(address: str | None, cpus_needed: float) -> None:
    """Connect to `address`, or start a local Ray instance big enough for the plan's CPU slots."""
    if ray.is_initialized():
        return
    if address is None:
        # Local mode: logical CPU slots may exceed the cores (it is for correctness, not speed).
        cpus = max(os.cpu_count() or 1, int(cpus_needed) + 2)
        ray.init(address="local", num_cpus=cpus, include_dashboard=False, logging_level=logging.WARNING)
    else:
        connect_ray(address)


def _build_kernels_here(choice: Any, device: str, dtype: torch.dtype) -> str:
    """On this node: the kernels a worker here will select and the routers' compiled split, built
    into torch's extension cache (a no-op once built); the node's IP."""
    from model.kernels import select_kernels

    select_kernels(choice, device, dtype)
    compiled_split()
    return _node_ip()


def _node_ip() -> str:
    return str(ray.util.get_node_ip_address())  # type: ignore[no-untyped-call]


_build_kernels = ray.remote(num_cpus=0)(_build_kernels_here)  # the same, on the node of a bundle


def available_nodes() -> list[dict[str, float]]:
    """Resources of each alive node (totals: a fresh placement group competes for them)."""
    return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]  # type: ignore[no-untyped-call]


class _Staging(NamedTuple):
    """A re-placement under way: the placement, the groups' reads, its report, its number, and how
    many workers had been replaced when it began."""

    placement: Placement
    refs: list[Any]
    report: dict[str, Any]
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
        self.setup = setup
        self.layout = Layout.of(cfg.cluster)
        self.num_shards = self.layout.attention_shards
        self.step_timeout_s = cfg.engine.step_timeout_s
        self.specs = worker_specs(self.layout, setup.model.num_experts)
        self.num_groups = self.layout.expert_groups
        self.slots = slots_per_group(setup.model.num_experts, self.num_groups, self.layout.redundant_experts)
        self.placement: Placement = setup.placement
        self._staging: _Staging | None = None
        self._replacements = 0  # re-placements begun: each one's staged weights go by its number
        self.recoveries: list[dict[str, Any]] = []  # workers replaced, and how long it took
        wanted = bundles(self.specs, worker_resources(cfg.cluster))
        check_transport(cfg.cluster)
        if cfg.cluster.device == "cuda":
            check_memory(setup.model, self.specs, cfg.dtype.itemsize, int(cfg.cluster.gpu_memory_gb * 1e9))
        self.bundle_offset = bundle_offset
        self.owns_placement = placement is None
        self.actors: list[Any] = []
        self.nodes: list[str] = []  # each worker's Ray node id, known once it has loaded
        if placement is None:
            ensure_ray(ray_address, sum(b.get("CPU", 0.0) for b in wanted))
            check_resources(wanted, available_nodes(), cfg.cluster.placement_strategy)
            placement = placement_group(wanted, strategy=cfg.cluster.placement_strategy)
        elif len(placement.bundle_specs) < bundle_offset + len(self.specs):
            raise PlacementError(
                f"the placement group has {len(placement.bundle_specs)} bundles; this layout needs "
                f"{bundle_offset + len(self.specs)} ({bundle_offset} before the workers)"
            )
        self.pg: PlacementGroup | None = placement
        try:
            self._wait_placement(cfg.cluster.placement_timeout_s, len(wanted))
            self._build_kernels()
            self.actors = self._start_actors()
            self._wait_loaded(timeout_s=max(self.step_timeout_s, STARTUP_TIMEOUT_S))
            self._form_data_plane(timeout_s=max(self.step_timeout_s, STARTUP_TIMEOUT_S))
            self.cost = self._measure_cost(timeout_s=max(self.step_timeout_s, STARTUP_TIMEOUT_S))
            self.setup = dataclasses.replace(self.setup, expert_cost=self.cost)  # replacements start with it
            self._get([a.set_cost.remote(self.cost) for a, s in zip(self.actors, self.specs, strict=True)
                       if s.role == "router"], self.step_timeout_s, "start-up",
                      workers=[i for i, s in enumerate(self.specs) if s.role == "router"])  # fmt: skip
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

    def _restart(self, i: int, setup: WorkerSetup, deadline: float) -> Any:
        """A new worker `i`, started once its bundle is placed again. When a whole node was lost, Ray
        first notices, then places the node's bundles elsewhere if there is room; a worker started
        before that is cancelled, and is started again."""
        assert self.pg is not None
        pg_id = self.pg.id.hex()
        no_room_since: float | None = None
        # Its host lost its Ray and Ray has not called it dead yet: nothing can start in its bundle until
        # Ray does (which took 32 s in a CI run), so where there is no room to place it again, waiting
        # for the verdict only delays the 503s.
        if self._host_state(self.nodes[i], ray.nodes()) == "gone" and self._no_room_before_verdict([i]):  # type: ignore[no-untyped-call]
            raise EngineError(f"the host of worker {self.specs[i].name} lost its Ray and there is no room left "
                              "to place it again: the copy is given up")  # fmt: skip
        while True:
            while (table := ray.util.placement_group_table(self.pg)).get("state") != "CREATED":
                now = time.monotonic()
                if now > deadline:
                    raise EngineError(f"the placement group {pg_id} was not placed again in time")
                # A bundle Ray has already given a live node is on its way (its resources are reserved
                # there, so they no longer show as free): only an unplaced one can lack room.
                no_room = (table.get("state") == "RESCHEDULING" and not self._bundle_placed(i, table)
                           and not self._room_for([i]))  # fmt: skip
                no_room_since = (no_room_since or now) if no_room else None
                if no_room_since is not None and now - no_room_since > NO_ROOM_CONFIRM_S:
                    raise EngineError(f"no room left on the cluster to place {self.specs[i].name} again "
                                      f"(it needs {self.pg.bundle_specs[self.bundle_offset + i]} free)")  # fmt: skip
                time.sleep(0.2)
            actor = self._start_actor(i, setup)
            try:
                where = ray.get(actor.where.remote(), timeout=max(deadline - time.monotonic(), 1.0))
                self.nodes[i] = where["node_id"]
                return actor
            except RayActorError as e:
                cancelled = "never ran" in str(e) or "cancelled" in str(e)
                if not cancelled or time.monotonic() > deadline:
                    raise
                logger.info("worker %s was cancelled before it ran (its bundle moves); starting it again",
                            self.specs[i].name)  # fmt: skip
                time.sleep(0.5)
            except GetTimeoutError as e:
                ray.kill(actor, no_restart=True)
                raise EngineError(f"{self.specs[i].name} did not start in time") from e

    def _room_for(self, workers: list[int]) -> bool:
        """Whether the cluster's free resources could hold these workers' bundles again (their sum: a
        necessary condition, so False means they cannot all be placed)."""
        assert self.pg is not None
        free = ray.available_resources()  # type: ignore[no-untyped-call]
        need: dict[str, float] = {}
        for i in workers:
            for k, v in self.pg.bundle_specs[self.bundle_offset + i].items():
                need[k] = need.get(k, 0.0) + v
        return all(free.get(k, 0.0) >= v for k, v in need.items() if v > 0)

    def _bundle_placed(self, i: int, table: dict[str, Any]) -> bool:
        """Whether worker `i`'s bundle is on a live node in `table` (`placement_group_table`)."""
        node = table.get("bundles_to_node_id", {}).get(self.bundle_offset + i)
        return node in {n["NodeID"] for n in ray.nodes() if n["Alive"]}  # type: ignore[no-untyped-call]

    def _build_kernels(self) -> None:
        """Phase "kernels": where workers will run the compiled CPU kernels, build them first, once per
        host, with a deadline of their own (a fresh host compiles for a while; the workers' loading
        deadline starts after)."""
        cfg = self.setup.config
        if cfg.cluster.device != "cpu" or cfg.dtype != torch.float32 or cfg.engine.kernels not in ("auto", "cpu"):
            return
        assert self.pg is not None
        logger.info("building the CPU kernels on each host of the copy (once per host; cached after)")
        # One task per host (the first bundle there), none on this process's own host: it builds them
        # here, beside the tasks, where torch is already imported (a task's process starts and imports it).
        here = ray.get_runtime_context().get_node_id()
        placed = ray.util.placement_group_table(self.pg)["bundles_to_node_id"]
        first_bundle: dict[str, int] = {}
        for i in range(len(self.specs)):
            first_bundle.setdefault(placed.get(self.bundle_offset + i, ""), i)
        refs = [
            _build_kernels.options(scheduling_strategy=PlacementGroupSchedulingStrategy(
                self.pg, placement_group_bundle_index=self.bundle_offset + i)).remote(
                cfg.engine.kernels, "cpu", cfg.dtype)
            for node, i in first_bundle.items() if node != here
        ]  # fmt: skip
        if here in first_bundle:
            try:
                _build_kernels_here(cfg.engine.kernels, "cpu", cfg.dtype)
            except Exception as e:
                raise EngineError(f"start-up phase 'kernels' failed on this host: {_first_line(e)} (engine.kernels: "
                                  "torch avoids the build)") from e  # fmt: skip
        ready, pending = ray.wait(refs, num_returns=len(refs), timeout=KERNEL_BUILD_TIMEOUT_S)
        if pending:
            raise EngineError(
                f"start-up phase 'kernels' timed out after {KERNEL_BUILD_TIMEOUT_S:.0f} s: the CPU kernels were still "
                "compiling on some host. Build them ahead on each host (`mixtral-cluster build-kernels`, e.g. in the "
                "launcher's setup_commands), or set engine.kernels: torch"
            )
        try:
            hosts = sorted(set(ray.get(ready)) | ({_node_ip()} if here in first_bundle else set()))
        except RayError as e:
            raise EngineError(f"start-up phase 'kernels' failed: {_first_line(e)} (engine.kernels: torch avoids "
                              "the build)") from e  # fmt: skip
        logger.info("CPU kernels ready on %s", ", ".join(hosts))

    def _start_actors(self) -> list[Any]:
        return [self._start_actor(i, self.setup) for i in range(len(self.specs))]

    def _wait_loaded(self, timeout_s: float) -> None:
        """Phase "loading": every worker has read its weights (its constructor has returned)."""
        phase, hint = "start-up phase 'loading' (reading weights)", "a slow disk or a checkpoint on a network mount"
        where = self._get([a.where.remote() for a in self.actors], timeout_s, phase,
                          hint=f"{hint}: raise engine.step_timeout_s")  # fmt: skip
        self.nodes = [w["node_id"] for w in where]

    def _start_actor(self, i: int, setup: WorkerSetup) -> Any:
        """Worker `i` (rank order) in its bundle of the placement group."""
        assert self.pg is not None
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
        return _remote(self.specs[i].role).options(**options).remote(self.specs[i], setup)

    def _form_data_plane(self, timeout_s: float) -> None:
        """Phase "data plane": every worker joins the process group at rank 0's node IP and a free port."""
        addr, port = self._get([self.actors[0].address.remote()], timeout_s, "start-up")[0]
        hint = (
            f"the workers could not all connect to rank 0 at {addr}:{port}: check that the hosts reach each "
            "other on their Ray addresses (any TCP port), or name the interface: cluster.network_interface"
        )
        rounds = self._get([a.join.remote(addr, port) for a in self.actors], timeout_s,
                           "start-up phase 'data plane'", hint=hint)  # fmt: skip
        self.exchange_round_s = max(r for r in rounds if r is not None)

    def _measure_cost(self, timeout_s: float) -> ExpertCost:
        """The copy's cost model (`protocol.expert_cost`): each expert group times one expert's FFN on
        1 and 64 rows, the sub-group timed a small all-to-all as it formed. A message's cost is that
        round's share per peer, twice (the rows go, the results come back). Lanes: groups on one GPU
        share it; on CPU a node's groups share its cores (over each worker's threads)."""
        groups = [i for i, s in enumerate(self.specs) if s.role == "experts"]
        rates = self._get([self.actors[i].calibrate.remote() for i in groups], timeout_s, "start-up phase "
                          "'calibrating'", workers=groups)  # fmt: skip
        peers = self.layout.routers + self.layout.expert_groups - 1
        groups_on: dict[str, int] = {}
        lanes_of: dict[str, int] = {}
        for _, _, lane, there in rates:
            groups_on[lane] = groups_on.get(lane, 0) + 1
            lanes_of[lane] = there
        lanes = sum(min(n, lanes_of[lane]) for lane, n in groups_on.items())
        cost = ExpertCost(
            weight_s=statistics.median(r[0] for r in rates),
            row_s=statistics.median(r[1] for r in rates),
            message_s=2 * self.exchange_round_s / max(peers, 1),
            lanes=lanes if lanes < len(rates) else 0,
            source=f"measured at start-up on {self.setup.config.cluster.device}",
        )
        logger.info("expert cost model: weights %.1f us, row %.2f us, message %.1f us per layer and group, "
                    "%s", cost.weight_s * 1e6, cost.row_s * 1e6, cost.message_s * 1e6,
                    f"{cost.lanes} lanes for {len(rates)} groups" if cost.lanes else "a device per group")  # fmt: skip
        return cost

    # ---- steps -------------------------------------------------------------------------------

    def execute(self, batches: list[ShardBatch]) -> Executed:
        """One step on every worker. A worker that dies is replaced and the step run again (`_recover`):
        no request fails for a lost router or expert group. A lost attention shard's KV cache is gone
        with it: `ShardsLost` tells the engine to recompute its sequences."""
        messages = step_messages(batches, self.specs)
        for _ in range(MAX_RECOVERIES + 1):
            results, dead, errors = self._step_everywhere(messages)
            if not dead and not errors:
                return self._executed(results)
            if errors or not dead:  # a worker failed by itself, not for a lost peer: the copy cannot go on
                name, error = next(iter(errors.items()))
                self.shutdown()
                raise EngineError(f"worker {name} failed during step: {_first_line(error)}") from error
            dead += self._going_with(dead)
            self._recover(dead)
            lost = [self.specs[i].index for i in dead if self.specs[i].role == "attention"]
            if lost:
                raise ShardsLost(lost)
            a, r = self.layout.attention_shards, self.layout.routers
            if all(res is not None for res in results[: a + r]):  # it died after the step's last exchange
                return self._executed(results)
        self.shutdown()
        raise EngineError(f"the step failed {MAX_RECOVERIES + 1} times: workers kept dying")

    def _executed(self, results: list[Any]) -> Executed:
        a, r = self.layout.attention_shards, self.layout.routers
        routed = results[a : a + r]  # each router's (tokens per expert [L, E], pairs per group [L, G])
        counts = torch.stack([c for c, _, _ in routed]).sum(0)
        groups = torch.stack([g for _, g, _ in routed]).sum(0)
        seconds = torch.stack([s for _, _, s in routed]).sum(0)
        return Executed(results[:a], counts, groups, seconds)

    def _step_everywhere(self, messages: list[StepMessage]) -> tuple[list[Any], list[int], dict[str, BaseException]]:
        """Run a step on every worker and wait for all of them (survivors of a dead worker fail fast:
        each tears its data plane down, so the peers blocked on it fail too; a silent peer fails them at
        the data plane's deadline). Returns each worker's result (None where it failed), the dead
        workers, and the failures that were not a dead peer.

        Once one worker has failed, the others have `UNREACHABLE_GRACE_S` to answer. A worker still
        silent then whose host has lost its Ray (`_host_state` "gone": a crash Ray has not yet noticed) is
        waited for up to `DEAD_VERDICT_S` more, until Ray calls it dead, then replaced; if the cluster
        has no room for it, the copy is given up at once instead (waiting would only delay the 503s).
        One whose host does not answer at all is on a host the engine cannot reach (partitioned, or
        powered off): its bundle cannot be moved while Ray holds the host alive, so the copy is given
        up at once (`EngineError`: its requests get 503 and Serve starts a copy on what is left), not
        after `step_timeout_s`.

        The workers' own deadline may not hold (one blocked on a link that drops its packets), so a
        step still running `data_plane_timeout_s` + `UNREACHABLE_GRACE_S` after it began has its
        silent workers' hosts probed (then every `UNREACHABLE_GRACE_S`): one that does not answer
        gives the copy up then too."""
        refs = [a.step.remote(m) for a, m in zip(self.actors, messages, strict=True)]
        outcome: dict[int, Any] = {}  # worker -> result, or the exception its step raised
        pending = list(refs)
        began = time.monotonic()
        step_deadline = began + self.step_timeout_s
        deadline, awaiting_verdict = step_deadline, False
        probe_at = began + self.setup.config.cluster.data_plane_timeout_s + UNREACHABLE_GRACE_S
        unreachable: list[Any] = []
        no_room: list[int] = []
        while pending:
            until = min(deadline, probe_at)
            ready, pending = ray.wait(pending, num_returns=1, timeout=max(until - time.monotonic(), 0.0))
            if not ready and time.monotonic() < deadline:  # probe time: is each silent worker's host there?
                known = ray.nodes()  # type: ignore[no-untyped-call]
                states = {n: self._host_state(n, known) for n in {self.nodes[refs.index(r)] for r in pending}}
                unreachable = [r for r in pending if states[self.nodes[refs.index(r)]] == "unreachable"]
                if unreachable:
                    break
                probe_at = time.monotonic() + UNREACHABLE_GRACE_S
                continue
            if not ready:
                peer_failed = any(isinstance(o, RayError) for o in outcome.values())
                known = ray.nodes() if peer_failed and not awaiting_verdict else []  # type: ignore[no-untyped-call]
                if known and all(self._host_state(self.nodes[refs.index(r)], known) == "gone" for r in pending):
                    # A crash: Ray calls the host dead within its health checks and fails these steps
                    # (on a loaded machine that can take longer than the grace); they are replaced then,
                    # unless there is no room for them: then nothing is gained by waiting for the verdict.
                    lost_workers = [refs.index(r) for r in pending]
                    if self._no_room_before_verdict(lost_workers):
                        no_room = lost_workers
                        break
                    awaiting_verdict = True
                    deadline = min(step_deadline, time.monotonic() + DEAD_VERDICT_S)
                    continue
                break
            i = refs.index(ready[0])
            try:
                outcome[i] = ray.get(ready[0])
            except RayError as e:
                outcome[i] = e
                if not awaiting_verdict:
                    deadline = min(deadline, time.monotonic() + UNREACHABLE_GRACE_S)
        if pending:
            silent = [self.specs[refs.index(r)] for r in pending]
            self.shutdown()
            names = ", ".join(s.name for s in silent)
            if no_room:
                raise EngineError(
                    f"the host of worker {names} lost its Ray and there is no room left to place "
                    f"{'it' if len(no_room) == 1 else 'them'} again: the copy is given up"
                )
            if unreachable:
                lost = ", ".join(self.specs[refs.index(r)].name for r in unreachable)
                raise EngineError(
                    f"the host of worker {lost} does not answer (partitioned or down) and the step has run "
                    f"{time.monotonic() - began:.0f} s: the copy is given up"
                )
            if any(isinstance(o, RayError) for o in outcome.values()):
                deadline_s = self.setup.config.cluster.data_plane_timeout_s
                raise EngineError(
                    f"worker {names} did not answer within {UNREACHABLE_GRACE_S:.0f} s of its peers' data plane "
                    f"failing (deadline cluster.data_plane_timeout_s = {deadline_s:g} s): its host is unreachable "
                    "(partitioned or down); the copy is given up"
                )
            raise EngineError(f"step timed out after {self.step_timeout_s:.0f} s waiting for {names}")
        results: list[Any] = []
        dead: list[int] = []
        errors: dict[str, BaseException] = {}
        for i in range(len(refs)):
            o = outcome[i]
            if not isinstance(o, RayError):
                results.append(o)
                continue
            if isinstance(o, RayActorError):
                dead.append(i)
            elif not isinstance(o, DataPlaneBroken):  # a survivor of a dead peer fails with DataPlaneBroken
                errors[self.specs[i].name] = o
            results.append(None)
        return results, dead, errors

    def _going_with(self, dead: list[int]) -> list[int]:
        """The other workers on the hosts of the `dead` ones where that host has lost its Ray: such a
        worker's process outlives its raylet for a moment, so it may have failed the step as a survivor
        (`DataPlaneBroken`) rather than as dead, and it dies when Ray calls the host dead, which may
        be while the data plane forms anew after the recovery (seen in `tests/test_node_loss.py`: the
        copy was given up). Replaced with the dead ones instead."""
        known = ray.nodes()  # type: ignore[no-untyped-call]
        gone = {n for n in {self.nodes[i] for i in dead} if self._host_state(n, known) == "gone"}
        going = [i for i, node in enumerate(self.nodes) if i not in dead and node in gone]
        if going:
            logger.warning("worker %s shares a lost host with a dead worker; replacing it too",
                           ", ".join(self.specs[i].name for i in going))  # fmt: skip
        return going

    def _no_room_before_verdict(self, workers: list[int]) -> bool:
        """Whether the cluster has no room for these workers' bundles while Ray still holds their hosts
        alive. The free resources first, Ray's verdict after: once Ray calls a host dead it places the
        lost bundles again at once, reserving their room on the nodes left, which then no longer shows
        as free. Still alive after the read: nothing was reserved before it, so the free resources are
        all there is."""
        return not self._room_for(workers) and self._verdict_pending(workers, ray.nodes())  # type: ignore[no-untyped-call]

    def _verdict_pending(self, workers: list[int], known: list[dict[str, Any]]) -> bool:
        """Whether Ray still holds alive (in `known`, `ray.nodes()`) every host of these workers: none
        of their bundles is being placed again yet, so the free resources are all there is."""
        alive = {n["NodeID"] for n in known if n["Alive"]}
        return all(self.nodes[i] in alive for i in workers)

    @staticmethod
    def _host_state(node_id: str, known: list[dict[str, Any]]) -> Literal["up", "gone", "unreachable", "unknown"]:
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

    def _recover(self, dead: list[int]) -> None:
        """Replace the dead workers in their bundles (with the copy's current expert placement) and form
        the data plane anew among all workers; the others keep their weights and KV caches. If that
        cannot be done, the copy is given up: shut down, `EngineError` (Serve then replaces it)."""
        names = ", ".join(self.specs[i].name for i in dead)
        logger.warning("worker %s died; replacing it", names)
        started = time.monotonic()
        try:
            setup = dataclasses.replace(self.setup, placement=self.placement)
            # In-flight requests wait on this: bounded by the step's deadline, not the (long) first placement's.
            deadline = time.monotonic() + min(self.setup.config.cluster.placement_timeout_s, self.step_timeout_s)
            for i in dead:
                self.actors[i] = self._restart(i, setup, deadline)
            self._form_data_plane(timeout_s=max(self.step_timeout_s, 60.0))
        except (EngineError, RayError) as e:
            self.shutdown()
            raise EngineError(f"worker {names} died and could not be replaced: {_first_line(e)}") from e
        self.recoveries.append({"workers": names, "seconds": time.monotonic() - started})
        logger.warning("worker %s replaced in %.1f s; the data plane is formed anew", names, time.monotonic() - started)

    # ---- expert placement --------------------------------------------------------------------

    def begin_rebalance(
        self,
        expert_counts: torch.Tensor,
        group_tokens: torch.Tensor,
        steps: list[RecordedStep],
        placement: AnyPlacement | None = None,
    ) -> dict[str, Any]:
        """Place every layer's experts for the load of `steps` (the last ones recorded; without them,
        `expert_counts` [L, E] as one step) by the cost model (`plan_placement`); the groups start
        reading the weights of experts new to them from the checkpoint, beside their steps, and
        `finish_rebalance` switches to it between steps. The report: the placement, the measured pair
        imbalance of `group_tokens` and the predicted one, per phase the predicted expert ms per step
        before and after; or "refused", and nothing moves, where every placement predicts a slower phase."""
        if self._staging is not None:
            raise RuntimeError("a re-placement is already under way")
        steps = steps or [("all", expert_counts.tolist())]
        if placement is None:
            new, report = plan_placement(steps, self.placement, self.slots, self.cost)
        else:  # as asked: what the model expects of it, taken whatever that is
            new = checked_placement(placement, self.slots, self.setup.model.num_layers, self.setup.model.num_experts)
            report = {"requested": True, "predicted": predict_steps(steps, new, len(self.slots), self.cost)}
        report = {"imbalance_before": layer_imbalance(group_tokens.tolist())} | report
        if "refused" in report:
            return report | {"moved": 0, "placement": [[list(g) for g in layer] for layer in self.placement]}
        refs, moved = [], 0
        self._replacements += 1
        for spec, actor in zip(self.specs, self.actors, strict=True):
            if spec.role == "experts":
                moves = moves_to([list(groups[spec.index]) for groups in self.placement], new, spec.index)
                moved += sum(len(by_slot) for by_slot in moves.values())
                if moves:
                    refs.append(actor.stage.remote(moves, self._replacements))
        report |= {"moved": moved, "placement": [[list(g) for g in layer] for layer in new]}
        self._staging = _Staging(new, refs, report, self._replacements, len(self.recoveries))
        logger.info("re-placing experts: %d expert weights to move", moved)
        return report

    def finish_rebalance(self) -> dict[str, Any] | None:
        """Between steps: once every group has read its new weights, switch the routers and groups to
        the new placement (queued before the next step) and return the report; None while they
        read. Abandoned (the placement stays, the report says why in "refused") if a group could not
        read them or a worker was replaced meanwhile (it started with the old placement)."""
        staging = self._staging
        if staging is None:
            return None
        ready, _ = ray.wait(staging.refs, num_returns=len(staging.refs), timeout=0)
        if len(ready) < len(staging.refs):
            return None
        self._staging = None
        why = None
        try:
            ray.get(staging.refs)
        except RayError as e:
            why = f"a group could not read its new weights ({_first_line(e)})"
        if why is None and len(self.recoveries) != staging.recoveries:
            why = "a worker was replaced while the weights moved (it holds the placement it started with)"
        for spec, actor in zip(self.specs, self.actors, strict=True):  # queued before the next step
            if spec.role == "router" and why is None:
                actor.commit_placement.remote(staging.placement)
            elif spec.role == "experts":
                (actor.drop if why else actor.commit).remote(staging.number)
        if why is not None:
            logger.warning("re-placement abandoned: %s; the placement stays", why)
            current = [[list(g) for g in layer] for layer in self.placement]
            return staging.report | {"refused": f"{why}: the placement stays", "moved": 0, "placement": current}
        self.placement = staging.placement
        return staging.report

    def _get(
        self, refs: list[Any], timeout_s: float, what: str, workers: list[int] | None = None, hint: str = ""
    ) -> list[Any]:
        """Results of one call per worker (`workers`: whose, by rank; default all, in order); the first
        failure or the timeout kills the copy and raises (with `hint`: what to do about a timeout)."""
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
                raise EngineError(f"worker {name} {kind} during {what}: {_first_line(e)}") from e
        return ray.get(refs)

    # ---- reports and shutdown ----------------------------------------------------------------

    def reports(self, report: Report) -> dict[str, Any]:
        """Each worker's report (`where`, `loaded`, `settings`, `step_times`), by worker name, in rank order."""
        return dict(zip((s.name for s in self.specs), self._call_all(report), strict=True))

    def set_profiling(self, on: bool) -> None:
        self._call_all("profile", on)

    def _call_all(self, method: str, *args: Any, timeout_s: float = 60.0) -> list[Any]:
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
