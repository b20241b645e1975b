"""Placement is pure: expert and shard maps, specs, bundles and fit checks, tested without Ray."""

from __future__ import annotations

import pytest
import torch

from cluster.backend.placement import (
    Layout,
    assign_slots,
    bundles,
    check_memory,
    check_resources,
    check_transport,
    expert_map,
    initial_placement,
    param_bytes,
    shard_routers,
    slots_per_group,
    worker_resources,
    worker_specs,
)
from cluster.engine.expert_planner import checked_placement, imbalance, place_experts
from model import ModelConfig, weight_names
from protocol.config import ClusterSection
from protocol.expert_cost import split_pairs as split_tokens
from protocol.experts import PlacementError

pytestmark = pytest.mark.unit


def test_expert_map_uneven_split() -> None:
    assert expert_map(8, 3) == [(0, 1, 2), (3, 4, 5), (6, 7)]
    assert expert_map(8, 8) == [(e,) for e in range(8)]
    assert expert_map(8, 1) == [tuple(range(8))]


@pytest.mark.parametrize("experts", [1, 4, 8, 16])
def test_every_expert_in_exactly_one_group(experts: int) -> None:
    for groups in range(1, experts + 1):
        m = expert_map(experts, groups)
        assert sorted(e for g in m for e in g) == list(range(experts))
        assert max(map(len, m)) - min(map(len, m)) <= 1


def test_impossible_layouts_say_why() -> None:
    with pytest.raises(PlacementError, match=r"expert_groups must be between 1 and num_experts \(8\), got 9"):
        expert_map(8, 9)
    with pytest.raises(PlacementError, match=r"routers must be between 1 and attention_shards \(2\)"):
        shard_routers(2, 3)
    with pytest.raises(PlacementError, match="attention_shards must be >= 1"):
        worker_specs(Layout(0, 1, 1), 8)


def test_specs_ranks_and_roles() -> None:
    specs = worker_specs(Layout(attention_shards=3, routers=2, expert_groups=3), num_experts=8)
    assert [s.name for s in specs] == [
        "attention-0", "attention-1", "attention-2", "router-0", "router-1", "experts-0", "experts-1", "experts-2",
    ]  # fmt: skip
    assert [s.rank for s in specs] == list(range(8))
    assert [s.router for s in specs[:3]] == [0, 1, 0]  # shard a -> router a % R
    assert [s.shards for s in specs[3:5]] == [(0, 2), (1,)]
    assert [s.experts for s in specs[5:]] == [(0, 1, 2), (3, 4, 5), (6, 7)]


def test_each_tensor_has_exactly_one_owner() -> None:
    cfg = ModelConfig.preset("tiny")
    specs = worker_specs(Layout(2, 2, 3), cfg.num_experts)
    shard_names = specs[0].weight_names(cfg)
    assert specs[1].weight_names(cfg) == shard_names  # attention is replicated across shards
    owned = shard_names + [n for s in specs if s.role != "attention" and s.index == 0 for n in s.weight_names(cfg)]
    owned += [n for s in specs if s.role == "experts" and s.index > 0 for n in s.weight_names(cfg)]
    assert sorted(owned) == sorted(weight_names(cfg))
    assert len(owned) == len(set(owned))


def test_param_bytes_per_group() -> None:
    cfg = ModelConfig.preset("mixtral-8x22b")
    specs = worker_specs(Layout(2, 1, 3), cfg.num_experts)
    per_expert = cfg.num_layers * 3 * cfg.hidden_size * cfg.intermediate_size * 2  # bf16
    groups = [param_bytes(cfg, s, 2) for s in specs if s.role == "experts"]
    assert groups == [3 * per_expert, 3 * per_expert, 2 * per_expert]
    assert param_bytes(cfg, specs[2], 2) == 2 * cfg.num_layers * cfg.num_experts * cfg.hidden_size  # gates only
    total = sum(param_bytes(cfg, s, 2) for s in specs if s.role != "attention" or s.index == 0)
    assert total == 2 * cfg.num_parameters


def test_memory_check_refuses_what_does_not_fit() -> None:
    cfg = ModelConfig.preset("mixtral-8x22b")
    with pytest.raises(PlacementError, match=r"experts-0 needs 1\d\d\.\d GB .* 80\.0 GB .*use more expert_groups"):
        check_memory(cfg, worker_specs(Layout(2, 1, 2), 8), dtype_bytes=2, device_memory_bytes=80 * 10**9)
    check_memory(cfg, worker_specs(Layout(2, 1, 8), 8), dtype_bytes=2, device_memory_bytes=80 * 10**9)


def test_bundles_and_resource_checks() -> None:
    specs = worker_specs(Layout(2, 2, 8), 8)
    gpu = bundles(specs, worker_resources(ClusterSection(device="cuda")), replica_bundle={"CPU": 1})
    assert gpu[0] == {"CPU": 1} and len(gpu) == 13
    assert all(b == {"GPU": 1.0, "CPU": 1.0} for b in gpu[1:])
    node = {"GPU": 8.0, "CPU": 96.0}
    with pytest.raises(PlacementError, match=r"needs 12 GPU \(the cluster has 8\)"):
        check_resources(gpu, [node])
    check_resources(gpu, [node, node])
    with pytest.raises(PlacementError, match="STRICT_SPREAD needs one node per bundle"):
        check_resources(gpu, [node, node], "STRICT_SPREAD")
    with pytest.raises(PlacementError, match="STRICT_PACK needs one node"):
        check_resources(gpu, [node, node], "STRICT_PACK")
    with pytest.raises(PlacementError, match="fits on no node"):
        check_resources([{"GPU": 1.0, "CPU": 1.0}] * 3, [{"GPU": 2.0, "CPU": 1.0}, {"GPU": 1.0, "CPU": 2.0}])
    assert bundles(specs, worker_resources(ClusterSection()))[0] == {"CPU": 1.0}


def test_a_cuda_data_plane_is_checked_before_anything_starts() -> None:
    shared = {"GPU": 0.25, "CPU": 1.0}  # four workers on one GPU
    with pytest.raises(PlacementError, match=r"0\.25 GPU.*NCCL refuses two ranks on a GPU.*transport: gloo"):
        check_transport(ClusterSection(device="cuda", worker_resources=shared))  # nccl: the default on cuda
    check_transport(ClusterSection(device="cuda", worker_resources=shared, transport="gloo"))
    check_transport(ClusterSection(device="cuda"))  # a whole GPU each: nccl is fine
    with pytest.raises(PlacementError, match="needs a GPU share"):
        check_transport(ClusterSection(device="cuda", worker_resources={"CPU": 1.0}, transport="gloo"))
    check_transport(ClusterSection())  # CPU: gloo, nothing to check
    with pytest.raises(ValueError, match="transport nccl moves GPU tensors: it needs device cuda"):
        ClusterSection(transport="nccl")
    assert ClusterSection(device="cuda").data_plane == "nccl" and ClusterSection().data_plane == "gloo"


def test_workers_sharing_a_gpu_are_planned_onto_it() -> None:
    slots = assign_slots(5, gpus_per_node=2, strategy="PACK", gpu_share=0.25)
    assert [(s.node, s.gpu) for s in slots] == [(0, 0)] * 4 + [(0, 1)]
    slots = assign_slots(4, gpus_per_node=1, strategy="PACK", gpu_share=0.2)
    assert {(s.node, s.gpu) for s in slots} == {(0, 0)}


def test_redundant_slots_and_the_initial_placement() -> None:
    assert slots_per_group(8, 4, 0) == [2, 2, 2, 2] and slots_per_group(8, 3, 2) == [4, 3, 3]
    assert initial_placement(8, 3, 0) == [list(ids) for ids in expert_map(8, 3)]
    groups = initial_placement(8, 4, 4)
    assert [len(g) for g in groups] == [3, 3, 3, 3]
    assert all(len(set(g)) == len(g) for g in groups)  # at most one replica of an expert per group
    assert sorted(e for g in groups for e in g) == sorted([*range(8), 0, 1, 2, 3])
    with pytest.raises(PlacementError, match="needs more groups"):
        slots_per_group(8, 2, 9)


@pytest.mark.parametrize("seed", range(20))
def test_placement_balances_any_load_and_fills_every_slot(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    num_experts, groups = 8, int(torch.randint(2, 5, (1,), generator=g))
    redundant = int(torch.randint(0, groups * 2, (1,), generator=g))
    slots = slots_per_group(num_experts, groups, redundant)
    load = (torch.rand(num_experts, generator=g) ** 4 * 1000).round().tolist()  # skewed
    placed = place_experts(load, slots)
    assert [len(p) for p in placed] == slots and all(len(set(p)) == len(p) for p in placed)
    assert set(e for p in placed for e in p) == set(range(num_experts))  # every expert somewhere
    holders = [[gr for gr in range(groups) if e in placed[gr]] for e in range(num_experts)]
    shares, per_group = split_tokens([int(x) for x in load], holders, groups)
    assert [sum(s) for s in shares] == [int(x) for x in load] and sum(per_group) == sum(int(x) for x in load)
    before = initial_placement(num_experts, groups, redundant)
    _, initial = split_tokens([int(x) for x in load], [[gr for gr in range(groups) if e in before[gr]]
                                                        for e in range(num_experts)], groups)  # fmt: skip
    assert max(per_group) <= max(initial)  # never worse than not looking at the load
    again = place_experts(load, slots, previous=placed)
    assert again == placed  # the same load: nothing moves


def holders_of(groups: list[list[int]], num_experts: int) -> list[list[int]]:
    return [[g for g, ids in enumerate(groups) if e in ids] for e in range(num_experts)]


def test_two_hot_experts_spread_over_every_group() -> None:
    load = [10, 10, 10, 10, 10, 10, 1000, 900]  # experts 6 and 7 share a group in the initial placement
    initial = initial_placement(8, 4, 4)
    _, before = split_tokens(load, holders_of(initial, 8), 4)
    placed = place_experts(load, slots_per_group(8, 4, 4), previous=initial)
    _, after = split_tokens(load, holders_of(placed, 8), 4)
    assert imbalance(before) > 3 and imbalance(after) < 1.3
    for old, new in zip(initial, placed, strict=True):  # an expert a group keeps stays in its slot
        assert all(new[slot] == e for slot, e in enumerate(old) if e in new)


def test_a_replicated_expert_splits_from_the_lightest_group() -> None:
    shares, per_group = split_tokens([10, 0, 7], [[0, 1, 2], [0], [1]], 3)
    assert per_group[1] == 7 and max(per_group) == 7 and sum(shares[0]) == 10
    shares, per_group = split_tokens([9, 1], [[0, 1], [1]], 2)
    assert per_group == [5, 5]
    assert imbalance([5, 7, 5]) == pytest.approx(7 / (17 / 3)) and imbalance([0, 0]) == 1.0


def test_a_placement_given_must_fit_the_slots_and_hold_every_expert() -> None:
    initial = [initial_placement(8, 4, 4)] * 2
    assert checked_placement(initial, [3, 3, 3, 3], 2, 8) == tuple(tuple(tuple(g) for g in layer) for layer in initial)
    for bad, why in [
        (initial[:1], "needs 2 layers"),
        ([initial[0], [[0, 1, 2], [3, 4, 5], [6, 7, 0], [1, 2]]], "layer 1: the groups have"),
        ([initial[0], [[0, 1, 1], [3, 4, 5], [6, 7, 0], [1, 2, 3]]], "layer 1, group 0: experts \\[0, 1, 1\\]"),
        ([initial[0], [[0, 1, 8], [3, 4, 5], [6, 7, 0], [1, 2, 3]]], "not distinct ids below 8"),
        ([[[0, 1, 2], [3, 4, 5], [0, 1, 2], [3, 4, 5]], initial[0]], "layer 0: no group holds experts \\[6, 7\\]"),
    ]:
        with pytest.raises(PlacementError, match=why):
            checked_placement(bad, [3, 3, 3, 3], 2, 8)
