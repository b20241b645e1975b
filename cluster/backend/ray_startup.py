"""Starting a copy on Ray, in named phases, each with its own deadline and a timeout that names it
and what to do: placement (reserve the placement group), kernels (build the compiled CPU kernels
once on each host that runs a worker, before any worker's deadline starts), loading (one actor per
bundle, each reads only its own tensors), data plane (the `torch.distributed` group from rank 0's
address, on the interface that carries each node's Ray IP), calibrating (the cost model the
routers split by, `protocol.expert_cost`)."""

from __future__ import annotations

import logging
import statistics
from typing import Any

import ray
import torch
from ray.exceptions import GetTimeoutError, RayError
from ray.util.placement_group import PlacementGroup, placement_group

from cluster.backend.placement import Layout, bundles, check_resources, worker_resources
from cluster.backend.ray_connect import available_nodes, ensure_ray, node_ip
from cluster.backend.ray_workers import Workers, error_gist
from cluster.engine.backend import EngineError
from protocol.expert_cost import ExpertCost, compiled_split
from protocol.experts import PlacementError
from protocol.worker import WorkerSetup, WorkerSpec

logger = logging.getLogger(__name__)

KERNEL_BUILD_TIMEOUT_S = 900.0  # compiling the CPU kernels on a fresh host (~20 s on 2 cores; slow disks more)
STARTUP_TIMEOUT_S = 60.0  # the least any start-up phase after placement waits


def reserve(
    setup: WorkerSetup, specs: list[WorkerSpec], ray_address: str | None, pg: PlacementGroup | None, bundle_offset: int
) -> Workers:
    """The copy's workers-to-be in a placement group: `pg` where one is given (a Serve replica's,
    whose first `bundle_offset` bundles are not theirs), else a new one made here (on the Ray
    cluster at `ray_address`, or a local one) once the cluster's resources could hold it."""
    cluster = setup.config.cluster
    wanted = bundles(specs, worker_resources(cluster))
    if pg is None:
        ensure_ray(ray_address, sum(b.get("CPU", 0.0) for b in wanted))
        check_resources(wanted, available_nodes(), cluster.placement_strategy)
        return Workers(specs, placement_group(wanted, strategy=cluster.placement_strategy), 0, True)
    if len(pg.bundle_specs) < bundle_offset + len(specs):
        raise PlacementError(
            f"the placement group has {len(pg.bundle_specs)} bundles; this layout needs "
            f"{bundle_offset + len(specs)} ({bundle_offset} before the workers)"
        )
    return Workers(specs, pg, bundle_offset, False)


def start_copy(workers: Workers, setup: WorkerSetup, layout: Layout) -> ExpertCost:
    """Every phase in turn, the workers left running with the routers holding the measured cost
    model (returned). A phase that fails or times out raises naming it; the caller shuts down."""
    cfg = setup.config
    phase_s = max(cfg.engine.step_timeout_s, STARTUP_TIMEOUT_S)
    wait_placement(workers, cfg.cluster.placement_timeout_s)
    build_kernels(workers, setup)
    workers.actors = [workers.start(i, setup) for i in range(len(workers.specs))]
    wait_loaded(workers, phase_s)
    exchange_round_s = form_data_plane(workers, phase_s)
    cost = measure_cost(workers, layout, exchange_round_s, cfg.cluster.device, phase_s)
    workers.call("set_cost", workers.of_role("router"), cost, timeout_s=cfg.engine.step_timeout_s, what="start-up")
    return cost


def wait_placement(workers: Workers, timeout_s: float) -> None:
    """Phase "placement": Ray has reserved every bundle."""
    pg = workers.pg
    assert pg is not None
    try:
        ray.get(pg.ready(), timeout=timeout_s)
    except GetTimeoutError as e:
        free = {
            k: v
            for k, v in ray.available_resources().items()  # type: ignore[no-untyped-call]
            if k in ("CPU", "GPU") or not (k.startswith(("bundle_group", "node:")) or "memory" in k)
        }
        raise PlacementError(
            f"the placement group of {len(workers.specs)} bundles ({pg.bundle_specs[0]} each) was not placed "
            f"within {timeout_s:.0f} s; the cluster has {free} free. Add nodes or shrink the layout."
        ) from e


def _build_kernels_here(choice: Any, device: str, dtype: torch.dtype) -> str:
    """On this node: the kernels a worker here will select and the routers' compiled split, built
    into torch's extension cache (a no-op once built); the node's IP."""
    from model.kernels import select_kernels

    select_kernels(choice, device, dtype)
    compiled_split()
    return node_ip()


_build_kernels = ray.remote(num_cpus=0)(_build_kernels_here)  # the same, on the node of a bundle


def build_kernels(workers: Workers, setup: WorkerSetup) -> None:
    """Phase "kernels": where workers will run the compiled CPU kernels, build them first, once per
    host, with a deadline of their own (a fresh host compiles for a while; the workers' loading
    deadline starts after)."""
    cfg = setup.config
    if cfg.cluster.device != "cpu" or cfg.dtype != torch.float32 or cfg.engine.kernels not in ("auto", "cpu"):
        return
    assert workers.pg is not None
    logger.info("building the CPU kernels on each host of the copy (once per host; cached after)")
    # One task per host (the first bundle there), none on this process's own host: it builds them
    # here, beside the tasks, where torch is already imported (a task's process starts and imports it).
    here = ray.get_runtime_context().get_node_id()
    placed = ray.util.placement_group_table(workers.pg)["bundles_to_node_id"]
    first_bundle: dict[str, int] = {}
    for i in range(len(workers.specs)):
        first_bundle.setdefault(placed.get(workers.bundle_offset + i, ""), i)
    refs = [
        _build_kernels.options(scheduling_strategy=workers.in_bundle(i)).remote(cfg.engine.kernels, "cpu", cfg.dtype)
        for node, i in first_bundle.items()
        if node != here
    ]
    if here in first_bundle:
        try:
            _build_kernels_here(cfg.engine.kernels, "cpu", cfg.dtype)
        except Exception as e:
            raise EngineError(f"start-up phase 'kernels' failed on this host: {error_gist(e)} (engine.kernels: "
                              "torch avoids the build)") from e  # fmt: skip
    ready, pending = ray.wait(refs, num_returns=len(refs), timeout=KERNEL_BUILD_TIMEOUT_S)
    if pending:
        raise EngineError(
            f"start-up phase 'kernels' timed out after {KERNEL_BUILD_TIMEOUT_S:.0f} s: the CPU kernels were still "
            "compiling on some host. Build them ahead on each host (`mixtral-cluster build-kernels`, e.g. in the "
            "launcher's setup_commands), or set engine.kernels: torch"
        )
    try:
        hosts = sorted(set(ray.get(ready)) | ({node_ip()} if here in first_bundle else set()))
    except RayError as e:
        raise EngineError(f"start-up phase 'kernels' failed: {error_gist(e)} (engine.kernels: torch avoids "
                          "the build)") from e  # fmt: skip
    logger.info("CPU kernels ready on %s", ", ".join(hosts))


def wait_loaded(workers: Workers, timeout_s: float) -> None:
    """Phase "loading": every worker has read its weights (its constructor has returned)."""
    phase, hint = "start-up phase 'loading' (reading weights)", "a slow disk or a checkpoint on a network mount"
    where = workers.get([a.where.remote() for a in workers.actors], timeout_s, phase,
                        hint=f"{hint}: raise engine.step_timeout_s")  # fmt: skip
    workers.nodes = [w["node_id"] for w in where]


def form_data_plane(workers: Workers, timeout_s: float) -> float:
    """Phase "data plane": every worker joins the process group at rank 0's node IP and a free port;
    the seconds of the small all-to-all round the router + expert-group sub-group timed as it formed."""
    addr, port = workers.get([workers.actors[0].address.remote()], timeout_s, "start-up")[0]
    hint = (
        f"the workers could not all connect to rank 0 at {addr}:{port}: check that the hosts reach each "
        "other on their Ray addresses (any TCP port), or name the interface: cluster.network_interface"
    )
    rounds = workers.get([a.join.remote(addr, port) for a in workers.actors], timeout_s,
                         "start-up phase 'data plane'", hint=hint)  # fmt: skip
    return float(max(r for r in rounds if r is not None))


def measure_cost(
    workers: Workers, layout: Layout, exchange_round_s: float, device: str, timeout_s: float
) -> ExpertCost:
    """Phase "calibrating": the copy's cost model (`protocol.expert_cost`). Each expert group times
    one expert's FFN as a step meets it (`ExpertGroup.calibrate`: 1 to 64 rows, each call on the next
    layer's cold weights, a least-squares line whose value at 0 rows is the weights' read and whose
    slope is a row), all groups at once; `weight_s` and `row_s` are the medians over groups. A
    message costs the data plane's timed all-to-all round's share per peer, twice (the rows go, the
    results come back). Lanes: groups on one GPU share it; on CPU a node's groups share its cores
    (over each worker's threads)."""
    groups = workers.of_role("experts")
    rates = workers.call("calibrate", groups, timeout_s=timeout_s, what="start-up phase 'calibrating'")
    peers = layout.routers + layout.expert_groups - 1
    groups_on: dict[str, int] = {}
    lanes_of: dict[str, int] = {}
    for _, _, lane, there in rates:
        groups_on[lane] = groups_on.get(lane, 0) + 1
        lanes_of[lane] = there
    lanes = sum(min(n, lanes_of[lane]) for lane, n in groups_on.items())
    cost = ExpertCost(
        weight_s=statistics.median(r[0] for r in rates),
        row_s=statistics.median(r[1] for r in rates),
        message_s=2 * exchange_round_s / max(peers, 1),
        lanes=lanes if lanes < len(rates) else 0,
        source=f"measured at start-up on {device}",
    )
    logger.info("expert cost model: weights %.1f us, row %.2f us, message %.1f us per layer and group, "
                "%s", cost.weight_s * 1e6, cost.row_s * 1e6, cost.message_s * 1e6,
                f"{cost.lanes} lanes for {len(rates)} groups" if cost.lanes else "a device per group")  # fmt: skip
    return cost
