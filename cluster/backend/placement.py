"""Placement: which worker holds what, and which resources it asks Ray for. Pure functions.

The layout (`Layout`), the roster of workers in rank order (`worker_specs`) with the experts each
group starts with, the bundles and resources Ray is asked for, and `plan`'s slots. Where the
experts go once their load is known is the engine's planner (`cluster.engine.expert_planner`).

A model copy is `A` attention shards, `R` routers (router r serves shards a with a % R == r) and
`G` expert groups (contiguous expert ranges, uneven allowed: 8 over 3 = 3/3/2). Global ranks in
the data-plane process group follow that order: shards, then routers, then groups, so that the
router + expert-group sub-group lists routers first.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from model.checkpoint import expected_shape
from model.config import ModelConfig
from protocol.config import ClusterSection, LLMConfig, Strategy
from protocol.experts import PlacementError
from protocol.worker import ROLE_PARTS, WorkerSetup, WorkerSpec


@dataclass(frozen=True)
class Layout:
    attention_shards: int = 1
    routers: int = 1
    expert_groups: int = 1
    redundant_experts: int = 0

    @classmethod
    def of(cls, cluster: ClusterSection) -> Layout:
        """The config's layout; one of each for a single-process copy."""
        if cluster.single_process:
            return cls()
        return cls(cluster.attention_shards, cluster.routers, cluster.expert_groups, cluster.redundant_experts)

    @property
    def num_workers(self) -> int:
        return self.attention_shards + self.routers + self.expert_groups


def expert_map(num_experts: int, num_groups: int) -> list[tuple[int, ...]]:
    """Contiguous expert ids per group, the first `num_experts % num_groups` groups one larger."""
    if not 1 <= num_groups <= num_experts:
        raise PlacementError(f"expert_groups must be between 1 and num_experts ({num_experts}), got {num_groups}")
    base, extra = divmod(num_experts, num_groups)
    out, start = [], 0
    for g in range(num_groups):
        n = base + (g < extra)
        out.append(tuple(range(start, start + n)))
        start += n
    return out


# ---- expert placement: which experts each group holds, and how tokens split over replicas -----
#
# Load: tokens routed to each expert (per layer). Slots: how many experts a group holds (its weight
# memory). With `redundant_experts` > 0 there are more slots than experts, and an expert may be
# held by several groups (at most once per group): its tokens are split between those replicas.


def slots_per_group(num_experts: int, num_groups: int, redundant: int) -> list[int]:
    """Expert slots of each group: the experts as `expert_map` spreads them, plus the redundant
    slots, one at a time to the groups with the fewest."""
    if redundant < 0:
        raise PlacementError(f"redundant_experts must be >= 0, got {redundant}")
    if redundant > (num_groups - 1) * num_experts:
        raise PlacementError(
            f"redundant_experts {redundant} needs more groups: {num_groups} groups hold at most "
            f"{(num_groups - 1) * num_experts} extra replicas of {num_experts} experts (one replica per group)"
        )
    slots = [len(ids) for ids in expert_map(num_experts, num_groups)]
    for _ in range(redundant):
        slots[min(range(num_groups), key=lambda g: (slots[g], g))] += 1
    return slots


def initial_placement(num_experts: int, num_groups: int, redundant: int) -> list[list[int]]:
    """Experts per group before any load is known: `expert_map`'s contiguous ranges, then each free
    slot, smallest groups first, to the expert the group lacks that has the fewest replicas."""
    slots = slots_per_group(num_experts, num_groups, redundant)
    groups = [list(ids) for ids in expert_map(num_experts, num_groups)]
    replicas = [1] * num_experts
    while any(len(groups[g]) < slots[g] for g in range(num_groups)):
        g = min((g for g in range(num_groups) if len(groups[g]) < slots[g]), key=lambda g: (len(groups[g]), g))
        e = min((e for e in range(num_experts) if e not in groups[g]), key=lambda e: (replicas[e], e))
        groups[g].append(e)
        replicas[e] += 1
    return groups


def shard_routers(num_shards: int, num_routers: int) -> list[int]:
    """Router index of each attention shard: shard a -> router a % R."""
    if not 1 <= num_routers <= num_shards:
        raise PlacementError(
            f"routers must be between 1 and attention_shards ({num_shards}) so each serves a shard, got {num_routers}"
        )
    return [a % num_routers for a in range(num_shards)]


def worker_specs(layout: Layout, num_experts: int) -> list[WorkerSpec]:
    """Every worker of one model copy, in global-rank order."""
    if layout.attention_shards < 1:
        raise PlacementError(f"attention_shards must be >= 1, got {layout.attention_shards}")
    routers = shard_routers(layout.attention_shards, layout.routers)
    groups = initial_placement(num_experts, layout.expert_groups, layout.redundant_experts)
    specs = [
        WorkerSpec("attention", a, a, router=routers[a], parts=ROLE_PARTS["attention"])
        for a in range(layout.attention_shards)
    ]
    specs += [
        WorkerSpec(
            "router",
            r,
            layout.attention_shards + r,
            shards=tuple(a for a, rr in enumerate(routers) if rr == r),
            parts=ROLE_PARTS["router"],
        )
        for r in range(layout.routers)
    ]
    base = layout.attention_shards + layout.routers
    specs += [
        WorkerSpec("experts", g, base + g, experts=tuple(ids), parts=ROLE_PARTS["experts"])
        for g, ids in enumerate(groups)
    ]
    return specs


def worker_setup(config: LLMConfig, model: ModelConfig, num_blocks: int) -> WorkerSetup:
    """What every worker of a copy is built from: the config and the tables its layout implies
    (the initial expert placement, the same in every layer)."""
    specs = worker_specs(Layout.of(config.cluster), model.num_experts)
    routers = tuple(s.rank for s in specs if s.role == "router")
    groups = tuple(s.experts for s in specs if s.role == "experts")
    return WorkerSetup(config, model, num_blocks, routers, tuple(groups for _ in range(model.num_layers)))


def param_bytes(config: ModelConfig, spec: WorkerSpec, dtype_bytes: int) -> int:
    """Bytes of parameters the worker holds in a dtype of `dtype_bytes` per element."""
    return dtype_bytes * sum(math.prod(expected_shape(config, n)) for n in spec.weight_names(config))


def worker_resources(cluster: ClusterSection) -> dict[str, float]:
    """A worker's bundle: the config's `worker_resources`, else one GPU each on GPU (NCCL allows one
    rank per GPU) and one CPU slot in local mode."""
    if cluster.worker_resources:
        return dict(cluster.worker_resources)
    if cluster.device == "cuda":
        return {"GPU": 1.0, "CPU": 1.0}
    return {"CPU": 1.0}


def check_transport(cluster: ClusterSection) -> None:
    """Fail fast when a CUDA copy cannot form its data plane: workers without a GPU, or NCCL ranks
    that would share one (NCCL refuses two ranks on a device: "Duplicate GPU detected")."""
    if cluster.device != "cuda":
        return
    asks = worker_resources(cluster)
    gpus = asks.get("GPU", 0.0)
    if gpus <= 0:
        raise PlacementError(f"device cuda needs a GPU share in cluster.worker_resources; each worker asks for {asks}")
    if cluster.data_plane == "nccl" and gpus < 1:
        raise PlacementError(
            f"transport nccl needs one GPU per worker, but each worker asks for {gpus:g} GPU, so several would "
            "share one and NCCL refuses two ranks on a GPU; use cluster.transport: gloo (the data plane through "
            "host memory) or give each worker a whole GPU (more GPUs)"
        )


def bundles(
    specs: Sequence[WorkerSpec],
    resources: Mapping[str, float],
    replica_bundle: Mapping[str, float] | None = None,
) -> list[dict[str, float]]:
    """Placement-group bundles: the replica's own first (when given), then one per worker in rank order."""
    head = [dict(replica_bundle)] if replica_bundle is not None else []
    return head + [dict(resources) for _ in specs]


def check_memory(
    config: ModelConfig,
    specs: Sequence[WorkerSpec],
    dtype_bytes: int,
    device_memory_bytes: int,
    reserve_fraction: float = 0.1,
) -> None:
    """Fail fast when a worker's weights cannot fit its device (leaving room for KV cache and activations)."""
    budget = device_memory_bytes * (1 - reserve_fraction)
    for spec in specs:
        need = param_bytes(config, spec, dtype_bytes)
        if need > budget:
            hint = "use more expert_groups" if spec.role == "experts" else "use a smaller dtype or larger devices"
            raise PlacementError(
                f"{spec.name} needs {need / 1e9:.1f} GB of weights at {dtype_bytes} bytes per parameter, "
                f"but a device has {device_memory_bytes / 1e9:.1f} GB ({budget / 1e9:.1f} GB usable after a "
                f"{reserve_fraction:.0%} reserve); {hint}"
            )


def check_resources(
    wanted: Sequence[Mapping[str, float]],
    nodes: Sequence[Mapping[str, float]],
    strategy: Strategy = "PACK",
) -> None:
    """Fail fast when bundles cannot be placed on nodes' available resources.

    First-fit-decreasing bin packing (one node per bundle for STRICT_SPREAD, one node in all for
    STRICT_PACK); a success here does not promise Ray will place them, a failure means it never will.
    """
    totals: dict[str, float] = {}
    for b in wanted:
        for k, v in b.items():
            totals[k] = totals.get(k, 0.0) + v
    have: dict[str, float] = {}
    for n in nodes:
        for k, v in n.items():
            have[k] = have.get(k, 0.0) + v
    short = {k: (v, have.get(k, 0.0)) for k, v in totals.items() if v > have.get(k, 0.0) + 1e-9}
    if short:
        parts = ", ".join(f"{need:g} {k} (the cluster has {got:g})" for k, (need, got) in short.items())
        raise PlacementError(f"this layout needs {parts}: {len(wanted)} bundles of {dict(wanted[-1])}")
    if strategy == "STRICT_SPREAD" and len(wanted) > len(nodes):
        raise PlacementError(f"STRICT_SPREAD needs one node per bundle: {len(wanted)} bundles, {len(nodes)} nodes")
    if strategy == "STRICT_PACK":
        if not any(_fits(totals, n) for n in nodes):
            raise PlacementError(f"STRICT_PACK needs one node with {totals}; no node has that much")
        return
    free = [dict(n) for n in nodes]
    for b in sorted(wanted, key=lambda b: -sum(b.values())):
        node = next((f for f in free if _fits(b, f)), None)
        if node is None:
            raise PlacementError(f"a bundle {dict(b)} fits on no node once the others are placed (nodes: {nodes})")
        for k, v in b.items():
            node[k] -= v


def _fits(bundle: Mapping[str, float], node: Mapping[str, float]) -> bool:
    return all(node.get(k, 0.0) + 1e-9 >= v for k, v in bundle.items())


@dataclass(frozen=True)
class Slot:
    """Where `plan` expects a worker: node index and GPU index on it (-1 for CPU workers)."""

    node: int
    gpu: int


def assign_slots(
    num_workers: int,
    gpus_per_node: int,
    strategy: Strategy,
    num_nodes: int | None = None,
    gpu_share: float = 1.0,
) -> list[Slot]:
    """GPUs for workers on nodes of `gpus_per_node`: PACK fills nodes in order, SPREAD deals round-robin.
    Each worker asks for `gpu_share` of a GPU; below 1, consecutive workers share a GPU (gloo only).

    This is the plan `mixtral-cluster plan` prints; Ray's placement group makes the real choice,
    under the same strategy. Fails when `num_nodes` nodes cannot hold the workers.
    """
    if gpu_share < 1:
        per_gpu = int(1 / gpu_share + 1e-9)
        gpus = _whole_gpus(math.ceil(num_workers / per_gpu), gpus_per_node, strategy, num_nodes)
        return [gpus[i // per_gpu] for i in range(num_workers)]
    return _whole_gpus(num_workers, gpus_per_node, strategy, num_nodes)


def _whole_gpus(num_workers: int, gpus_per_node: int, strategy: Strategy, num_nodes: int | None) -> list[Slot]:
    needed = math.ceil(num_workers / gpus_per_node)
    nodes = needed if num_nodes is None else num_nodes
    if nodes * gpus_per_node < num_workers:
        raise PlacementError(
            f"{num_workers} workers need {num_workers} GPUs ({needed} nodes of {gpus_per_node}); "
            f"{nodes} nodes have {nodes * gpus_per_node}"
        )
    if strategy in ("STRICT_PACK",) and num_workers > gpus_per_node:
        raise PlacementError(f"STRICT_PACK puts all {num_workers} workers on one node of {gpus_per_node} GPUs")
    if strategy in ("PACK", "STRICT_PACK"):
        return [Slot(i // gpus_per_node, i % gpus_per_node) for i in range(num_workers)]
    if strategy == "STRICT_SPREAD" and num_workers > nodes:
        raise PlacementError(f"STRICT_SPREAD needs one node per worker: {num_workers} workers, {nodes} nodes")
    return [Slot(i % nodes, i // nodes) for i in range(num_workers)]
