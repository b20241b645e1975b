"""The cost model of an expert group's part of a layer, and the split of a step's pairs over an
expert's replicas that makes the slowest group fastest: checked against every possible split."""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Iterator, Sequence

import pytest

from benchmarks import split_cost
from cluster.backend.placement import initial_placement
from cluster.engine.expert_planner import place_experts, plan_placement, predict_steps
from protocol.expert_cost import (
    ROW_UNITS,
    TOKENS,
    ExpertCost,
    _connected_sets,
    _least_slowest,
    compiled_split,
    fitted_line,
    layer_seconds,
    split_pairs,
    split_pairs_python,
)
from protocol.experts import holders as holders_of

pytestmark = pytest.mark.unit


def splits(n: int, parts: int) -> Iterator[tuple[int, ...]]:
    """Every way to write n as `parts` non-negative integers in order."""
    if parts == 1:
        yield (n,)
        return
    for first in range(n + 1):
        for rest in splits(n - first, parts - 1):
            yield (first, *rest)


def brute_force(counts: Sequence[int], holders: Sequence[Sequence[int]], groups: int, cost: ExpertCost) -> float:
    """The least slowest group over every split of every expert's pairs over its holders."""
    best = float("inf")
    for shares in itertools.product(*(list(splits(c, len(h))) for c, h in zip(counts, holders, strict=True))):
        best = min(best, cost.layer_time(layer_seconds(shares, holders, groups, cost)))
    return best


def random_case(rng: random.Random) -> tuple[list[int], list[list[int]], int]:
    groups = rng.randint(2, 4)
    experts = rng.randint(2, 4)
    holders = [sorted(rng.sample(range(groups), rng.randint(1, min(3, groups)))) for _ in range(experts)]
    return [rng.randint(0, 7) for _ in range(experts)], holders, groups


# Rates that are whole multiples of a row's 1/ROW_UNITS: the split is exact for them, not rounded.
COSTS = [TOKENS, ExpertCost(weight_s=3.0, row_s=1.0, message_s=0.5), ExpertCost(weight_s=12.0, row_s=1.0),
         ExpertCost(weight_s=0.25, row_s=1.0, message_s=2.0), ExpertCost(weight_s=4.0, row_s=1.0, lanes=2),
         ExpertCost(weight_s=1.0, row_s=1.0, message_s=1.0, lanes=1)]  # fmt: skip


@pytest.mark.parametrize("split", [split_pairs, split_pairs_python], ids=["compiled", "python"])
@pytest.mark.parametrize("seed", range(72))
def test_the_split_is_the_min_max_optimum(seed: int, split: Callable[..., tuple[list[list[int]], list[int]]]) -> None:
    rng = random.Random(seed)
    counts, holders, groups = random_case(rng)
    cost = COSTS[seed % len(COSTS)]
    shares, per_group = split(counts, holders, groups, cost)
    assert [sum(s) for s in shares] == counts and all(n >= 0 for s in shares for n in s)
    assert sum(per_group) == sum(counts)
    layer = cost.layer_time(layer_seconds(shares, holders, groups, cost))
    assert layer == pytest.approx(brute_force(counts, holders, groups, cost))


def test_the_compiled_split_gives_the_python_split() -> None:
    """The routers' compiled split (built here: CI has the compiler) against the Python reference on
    placements as `rebalance` makes them, up to 16 groups and 8 replicas, every cost model shape."""
    assert compiled_split() is not None, "the compiled split did not build"
    rng = random.Random(7)
    rates = [*COSTS, ExpertCost(weight_s=210e-6, row_s=0.6e-6, message_s=25e-6)]
    for _ in range(300):
        experts = rng.choice([4, 8])
        groups = rng.choice([2, 3, 4, 8, 16] if experts == 8 else [2, 3, 4])
        redundant = rng.randint(max(1, groups - experts), min(8, experts * (groups - 1)))
        slots = split_cost._slots(groups, redundant) if experts == 8 else [
            len(g) for g in initial_placement(experts, groups, redundant)]  # fmt: skip
        held = holders_of(place_experts([rng.random() ** 3 for _ in range(experts)], slots), experts)
        counts = [rng.choice([0, 1, 2, 5, 17, 64, 300, 2000]) for _ in range(experts)]
        cost = rng.choice(rates)
        assert split_pairs(counts, held, groups, cost) == split_pairs_python(counts, held, groups, cost), (
            counts, held, groups, cost)  # fmt: skip


def test_decode_sizes_concentrate_a_hot_expert_and_prefill_sizes_spread_it() -> None:
    holders = [[0, 1, 2], [1], [2], [3]]
    reads = ExpertCost(weight_s=20.0, row_s=1.0, message_s=1.0)  # a row costs little beside the weights
    shares, _ = split_pairs([6, 1, 1, 1], holders, 4, reads)
    assert shares[0] == [6, 0, 0]  # one read of the hot expert, on the group with nothing else
    shares, _ = split_pairs([600, 1, 1, 1], holders, 4, reads)
    assert min(shares[0]) > 150  # rows dominate: every holder computes it


def test_groups_that_share_lanes_do_not_read_weights_twice_for_nothing() -> None:
    """Four groups on two cores: a second holder of a hot expert adds its weight read to the total
    the two cores must get through, so at decode sizes it only pays where a group is idle."""
    holders = [[0, 1], [2], [3], [2]]  # group 1 holds only a replica of the hot expert 0
    own = ExpertCost(weight_s=20.0, row_s=1.0)
    shared = ExpertCost(weight_s=20.0, row_s=1.0, lanes=2)
    assert split_pairs([60, 5, 5, 5], holders, 4, own)[0][0] == [30, 30]  # 50 / 50 / 50 / 25
    assert split_pairs([60, 5, 5, 5], holders, 4, shared)[0][0] == [60, 0]  # 80 beats (50+50+50+25) / 2
    assert shared.layer_time([50, 30, 30, 30]) == 70 and own.layer_time([50, 30, 30, 30]) == 50
    assert shared.ideal_time([50, 30, 30, 30]) == 70 and own.ideal_time([50, 30, 30, 30]) == 35
    waits = ExpertCost(weight_s=20.0, row_s=1.0, message_s=10.0, lanes=2)  # a message is no lane's work
    assert waits.layer_time([40, 40, 40, 0]) == 45 and waits.layer_time([60, 0, 0, 0]) == 60


def test_the_issue_load_splits_evenly() -> None:
    """Every token to experts 0 and 1, each held by three of four groups: the water-filling split
    gave 35/21/36/36 pairs; the optimum is 32 each."""
    holders = [[0, 1, 3], [0, 2, 3], [2], [3], [1], [1], [2], [0]]
    _, per_group = split_pairs([64, 64, 0, 0, 0, 0, 0, 0], holders, 4)
    assert per_group == [32, 32, 32, 32]


def test_cost_model_units_and_refusals() -> None:
    cost = ExpertCost(weight_s=2e-5, row_s=1e-6, message_s=5e-6)
    assert cost.units() == (20 * ROW_UNITS, 5 * ROW_UNITS)
    assert cost.group_seconds([0, 0]) == 0.0
    assert cost.group_seconds([3, 0, 1]) == pytest.approx(5e-6 + 2 * 2e-5 + 4e-6)
    with pytest.raises(ValueError, match="row_s > 0"):
        ExpertCost(weight_s=1.0, row_s=0.0)


def test_the_planner_predicts_the_split_and_refuses_a_slower_phase() -> None:
    cost = ExpertCost(weight_s=8.0, row_s=1.0, message_s=1.0)
    current = tuple(((0, 1, 4), (2, 3, 5), (6, 7, 0), (1, 2, 3)) for _ in range(2))
    slots = [3, 3, 3, 3]
    hot = [[0, 0, 0, 0, 0, 0, 40, 40]] * 2  # experts 6 and 7 share group 2
    steps = [("prefill", hot), ("decode", [[0, 0, 0, 0, 0, 0, 2, 2]] * 2)]
    placement, report = plan_placement(steps, current, slots, cost)
    assert "refused" not in report and placement != current
    for figures in report["phases"].values():
        assert figures["expert_ms_after"] < figures["expert_ms_before"]
    again = predict_steps(steps, placement, 4, cost)
    assert again["pair_imbalance"] == pytest.approx(report["imbalance_after"])
    even = [("decode", [[1, 1, 1, 1, 1, 1, 1, 1]] * 2)]  # already as fast as it gets: no move pays
    kept, refused = plan_placement(even, placement, slots, cost)
    assert kept == placement and "no faster step" in refused["refused"]
    # Balancing tokens would cost more weight reads than it saves, in both phases:
    initial = (tuple(tuple(g) for g in initial_placement(8, 4, 4)),)
    steps = [("prefill", [[1, 0, 30, 0, 5, 0, 1, 0]]), ("decode", [[1, 0, 0, 2, 1, 1, 1, 0]])]
    kept, refused = plan_placement(steps, initial, slots, cost)
    assert kept == initial and "slower decode and prefill steps" in refused["refused"]
    assert "expert_ms_after" not in refused["phases"]["decode"]


@pytest.mark.parametrize("seed", range(40))
def test_halls_condition_needs_only_the_connected_sets(seed: int) -> None:
    """The least slowest group over the connected sets of experts is the one over every set."""
    rng = random.Random(100 + seed)
    groups, experts = rng.randint(2, 8), rng.randint(2, 6)
    allowed = [sorted(rng.sample(range(groups), rng.randint(1, min(3, groups)))) for _ in range(experts)]
    need = [rng.randint(0, 40) for _ in range(experts)]
    fixed = [rng.randint(0, 5 * ROW_UNITS) for _ in range(groups)]
    paying = [rng.random() < 0.5 for _ in range(groups)]
    every = range(1, 1 << experts)
    connected = _connected_sets(tuple(sum(1 << g for g in a) for a in allowed))
    assert set(connected) <= set(every)
    assert _least_slowest(allowed, need, fixed, paying) == _least_slowest(allowed, need, fixed, paying, every)


def test_the_split_benchmark_times_every_case() -> None:
    rows = [split_cost.measure(g, r, n, steps=3) for g, r, n in [(4, 4, 64), (8, 8, 512), (16, 8, 256)]]
    assert [row["replicated"] for row in rows] == [2, 6, 6] and all(row["same_split"] for row in rows)
    for name in ("compiled", "python"):
        assert all(0 < row[f"{name}_median_us"] <= row[f"{name}_max_us"] for row in rows)


def test_the_calibration_line_is_the_least_squares_one() -> None:
    """`ExpertGroup.calibrate`'s line: exact points give their line; a row never costs nothing, and
    the weights' read is never negative."""
    rows = [1, 2, 4, 8, 16, 32, 64]
    assert fitted_line(rows, [700e-6 + 30e-6 * n for n in rows]) == pytest.approx((700e-6, 30e-6))
    kernel_switch = [559, 596, 901, 1301, 1493, 1974, 2600]  # us: the loop to 4 rows, oneDNN from 8 (measured)
    weight, row = fitted_line(rows, [us * 1e-6 for us in kernel_switch])
    assert 700e-6 < weight < 850e-6 and 28e-6 < row < 34e-6
    weight, row = fitted_line(rows, [1e-3 - 1e-5 * n for n in rows])  # faster with more rows: noise
    assert row == 1e-9 and weight == pytest.approx(1e-3 - 1e-5 * sum(rows) / len(rows), rel=1e-3)
    assert fitted_line(rows, [1e-5 * n - 1e-4 for n in rows])[0] == 0.0
