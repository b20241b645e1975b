"""Where the experts go: the engine's planner, pure functions beside the balancer that calls it.

Load: tokens routed to each expert (per layer). Slots: how many experts a group holds (its weight
memory). With redundant slots there are more slots than experts, and an expert may be held by
several groups (at most once per group): its tokens are split between those replicas by the
routers' own split (`protocol.expert_cost.split_pairs`). `place_experts` is the token-balanced
placement of one layer; `predict_steps` replays recorded steps under a placement with the cost
model; `plan_placement` picks the candidate it expects fastest; `checked_placement` checks one a
caller gives.

Shapes: L layers, E experts, G expert groups.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from protocol.expert_cost import ExpertCost, layer_seconds, split_pairs
from protocol.experts import Placement, PlacementError, holders

RecordedStep = tuple[str, list[list[int]]]  # (phase, [layer][expert] -> pairs) of one step


def imbalance(group_tokens: Sequence[float]) -> float:
    """The heaviest group's tokens over the mean over groups (1.0: even; G: one group has all)."""
    mean = sum(group_tokens) / len(group_tokens)
    return max(group_tokens) / mean if mean > 0 else 1.0


def layer_imbalance(group_tokens: Sequence[Sequence[float]]) -> float:
    """The mean over layers (those with tokens) of each layer's `imbalance`: each layer waits for
    its heaviest group, so that is what a step pays."""
    rows = [imbalance(row) for row in group_tokens if sum(row) > 0]
    return sum(rows) / len(rows) if rows else 1.0


def place_experts(
    load: Sequence[float], slots: Sequence[int], previous: Sequence[Sequence[int]] | None = None
) -> list[list[int]]:
    """Experts per group for one layer, from the tokens each expert got: the heaviest group as light
    as the greedy of expert-parallel load balancers (EPLB) makes it. The extra slots go one by one
    to the expert with the most tokens per replica; replicas are then placed, those of experts with
    the most replicas first, heaviest first, each in the least loaded group with a free slot that
    does not hold it yet. With `previous`, experts a group keeps stay in their slots (fewer weights
    to move). Every slot is filled."""
    num_experts, num_groups = len(load), len(slots)
    if sum(slots) < num_experts or max(slots) > num_experts:
        raise PlacementError(f"{sum(slots)} slots in groups of at most {max(slots)} cannot hold {num_experts} experts")
    replicas = [1] * num_experts
    for _ in range(sum(slots) - num_experts):
        e = max((e for e in range(num_experts) if replicas[e] < num_groups),
                key=lambda e: (load[e] / replicas[e], -e))  # fmt: skip
        replicas[e] += 1
    members: list[list[int]] = [[] for _ in range(num_groups)]
    group_load = [0.0] * num_groups
    for e in sorted(range(num_experts), key=lambda e: (-replicas[e], -load[e] / replicas[e], e)):
        for _ in range(replicas[e]):
            free = [g for g in range(num_groups) if len(members[g]) < slots[g] and e not in members[g]]
            if not free:  # no group left for another replica: the slot goes to the fill below
                break
            g = min(free, key=lambda g: (group_load[g], g))
            members[g].append(e)
            group_load[g] += load[e] / replicas[e]
    for g in range(num_groups):  # slots a replica could not take: the heaviest expert this group lacks
        while len(members[g]) < slots[g]:
            e = max((e for e in range(num_experts) if e not in members[g]), key=lambda e: (load[e], -e))
            members[g].append(e)
    if previous is not None:
        members = [_keep_slots(old, new) for old, new in zip(previous, members, strict=True)]
    return members


def _keep_slots(old: Sequence[int], new: list[int]) -> list[int]:
    """`new`'s experts in slot order, those also in `old` in their old slots."""
    kept = [e if e in new else None for e in old]
    arriving = iter(e for e in new if e not in old)
    return [e if e is not None else next(arriving) for e in kept]


def predict_steps(
    steps: Sequence[RecordedStep], placement: Placement, num_groups: int, cost: ExpertCost
) -> dict[str, Any]:
    """What `steps` cost under `placement`, each split as the routers split it (`split_pairs`): the
    pair imbalance over them all (`layer_imbalance` of the summed pairs), and per phase the expert
    milliseconds per step (`ExpertCost.layer_time`, summed over layers) and the cost imbalance
    (that over the same work spread evenly, `ideal_time`). A split per step and layer: the planner
    runs it, between steps."""
    num_experts = len(steps[0][1][0]) if steps else 0
    held = [holders(groups, num_experts) for groups in placement]  # [L][E] -> groups
    pairs = [[0] * num_groups for _ in placement]  # [L][G]
    phases: dict[str, list[float]] = {}  # phase -> [layer time s, ideal time s, steps]
    for phase, counts in steps:
        acc = phases.setdefault(phase, [0.0, 0.0, 0])
        for layer, layer_counts in enumerate(counts):
            shares, per_group = split_pairs(layer_counts, held[layer], num_groups, cost)
            seconds = layer_seconds(shares, held[layer], num_groups, cost)
            acc[0] += cost.layer_time(seconds)
            acc[1] += cost.ideal_time(seconds)
            pairs[layer] = [a + b for a, b in zip(pairs[layer], per_group, strict=True)]
        acc[2] += 1
    return {
        "pair_imbalance": layer_imbalance(pairs),
        "phases": {
            p: {"expert_ms": 1e3 * slow / n, "cost_imbalance": slow / mean if mean > 0 else 1.0}
            for p, (slow, mean, n) in phases.items()
        },
    }


def plan_placement(
    steps: Sequence[RecordedStep], current: Placement, slots: Sequence[int], cost: ExpertCost
) -> tuple[Placement, dict[str, Any]]:
    """The placement for the load of `steps` that the cost model expects to be fastest, and the
    report: each phase's predicted expert ms per step and cost imbalance now and with it, and the
    pair imbalance it predicts. Candidates: `place_experts` on the load of all steps and on each
    phase's alone (the phases want replicas of different experts when they load differently),
    each keeping `current`'s slots where it can; the one with the least predicted time over all
    steps wins. A candidate that predicts any phase slower than now, or no step faster, is not
    taken: if none is left, the report says why ("refused") and `current` stays."""
    phases = sorted(_steps_per_phase(steps))
    loads = [_summed(steps)] + ([_summed([s for s in steps if s[0] == p]) for p in phases] if len(phases) > 1 else [])
    now = predict_steps(steps, current, len(slots), cost)
    per_phase = _steps_per_phase(steps)
    now_total = sum(now["phases"][p]["expert_ms"] * n for p, n in per_phase.items())
    best: tuple[float, Placement, dict[str, Any]] | None = None
    slower: list[str] = []
    for load in loads:
        candidate: Placement = tuple(
            tuple(tuple(g) for g in place_experts(layer_load, slots, previous=old))
            for layer_load, old in zip(load, current, strict=True)
        )
        then = predict_steps(steps, candidate, len(slots), cost)
        worse = [p for p, f in now["phases"].items() if then["phases"][p]["expert_ms"] > f["expert_ms"] * (1 + 1e-9)]
        total = sum(then["phases"][p]["expert_ms"] * n for p, n in per_phase.items())
        if worse:
            slower += worse
        elif total < now_total * (1 - 1e-9) and (best is None or total < best[0]):
            best = (total, candidate, then)
    report: dict[str, Any] = {
        "phases": {
            p: {"expert_ms_before": f["expert_ms"], "cost_imbalance_before": f["cost_imbalance"]}
            for p, f in now["phases"].items()
        },
        "predicted_pair_imbalance_before": now["pair_imbalance"],
        "cost": cost.as_dict(),
    }
    if best is None:
        why = f"slower {' and '.join(sorted(set(slower)))} steps" if slower else "no faster step"
        report["refused"] = f"every placement tried predicts {why} than the one the experts have: it stays"
        return current, report
    _, chosen, then = best
    for p, figures in report["phases"].items():
        figures["expert_ms_after"] = then["phases"][p]["expert_ms"]
        figures["cost_imbalance_after"] = then["phases"][p]["cost_imbalance"]
    report["imbalance_after"] = then["pair_imbalance"]
    return chosen, report


def checked_placement(
    placement: Sequence[Sequence[Sequence[int]]], slots: Sequence[int], num_layers: int, num_experts: int
) -> Placement:
    """`placement` ([layer][group] -> experts in slot order) as a Placement, if it fits a copy with
    these slots per group: every layer, every group with its number of slots, no expert twice in a
    group, every expert held somewhere. PlacementError naming what does not fit otherwise."""
    if len(placement) != num_layers:
        raise PlacementError(f"a placement needs {num_layers} layers, got {len(placement)}")
    for layer, groups in enumerate(placement):
        if [len(g) for g in groups] != list(slots):
            raise PlacementError(f"layer {layer}: the groups have {list(slots)} slots, got {[len(g) for g in groups]}")
        for g, experts in enumerate(groups):
            if len(set(experts)) != len(experts) or not all(0 <= e < num_experts for e in experts):
                raise PlacementError(f"layer {layer}, group {g}: experts {list(experts)} are not distinct ids "
                                     f"below {num_experts}")  # fmt: skip
        if missing := set(range(num_experts)) - {e for g in groups for e in g}:
            raise PlacementError(f"layer {layer}: no group holds experts {sorted(missing)}")
    return tuple(tuple(tuple(int(e) for e in g) for g in groups) for groups in placement)


def _summed(steps: Sequence[RecordedStep]) -> list[list[float]]:
    """[layer][expert] -> pairs over `steps`."""
    return [[float(sum(x)) for x in zip(*layer, strict=True)] for layer in zip(*(c for _, c in steps), strict=True)]


def _steps_per_phase(steps: Sequence[RecordedStep]) -> dict[str, int]:
    out: dict[str, int] = {}
    for phase, _ in steps:
        out[phase] = out.get(phase, 0) + 1
    return out
