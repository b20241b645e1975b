"""What an expert group's part of one MoE layer costs, and the split of a step's (token, expert)
pairs over an expert's replicas that makes the slowest group as fast as possible. Pure.

The model (`ExpertCost`): a group that computes rows of an expert reads that expert's weights
once (`weight_s`: its bytes over the memory bandwidth) and pays `row_s` per row (its FLOPs over the
compute rate); a group that receives any rows pays `message_s` for the exchange. So one row of an
expert costs its whole weights at decode sizes, and rows dominate at prefill sizes.

The split (`split_pairs`) is exact for the model, with costs counted in integer units of
1/ROW_UNITS of a row. An expert held once sends all its pairs there. For the replicated experts it
chooses which holders compute them (each one it uses pays the weights) by branch and bound; for
each choice the least possible slowest group follows from Hall's condition on the bipartite graph
of experts and the holders allowed them, and one max-flow gives the rows.

Hall's condition and the bounds range over sets of replicated experts; only the sets whose groups
form one connected piece count (where two pieces share no group, each fills on its own and the
union needs no more than the worse of them), so they range over those (`_connected_sets`, cached
per holder table: it changes only with the placement).

The routers run it compiled (`protocol/csrc/expert_split.cpp`: the same search, bounds, tie-breaks
and flow, so the same split; built on first use like the CPU kernels), tens of microseconds per
layer where the Python (`split_pairs_python`, the reference) takes milliseconds with six
replicated experts: `python -m benchmarks.split_cost` times both on the same loads.
"""

from __future__ import annotations

import functools
import itertools
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model.kernels import compiled

SEARCH_BUDGET = 300  # nodes of the branch and bound before the best found so far stands
ROW_UNITS = 64  # cost units per row: weights and messages are rounded to 1/64 of a row's cost
SPLIT_SOURCE = Path(__file__).resolve().parent / "csrc" / "expert_split.cpp"
COMPILED_MAX_GROUPS = 63  # a set of groups is a 64-bit mask there (and at most 20 replicated experts with pairs)


@dataclass(frozen=True)
class ExpertCost:
    """Seconds a group spends on one layer: `message_s` if it gets rows at all, then per expert it
    computes `weight_s` + rows x `row_s`. `lanes`: how many groups can compute at once (0: each on
    its own device; on one CPU host, its cores over the workers' threads), so a layer takes at
    least the groups' compute over the lanes. `source` says where the rates come from."""

    weight_s: float
    row_s: float
    message_s: float = 0.0
    lanes: int = 0
    source: str = "tokens"

    def __post_init__(self) -> None:
        if self.row_s <= 0 or self.weight_s < 0 or self.message_s < 0 or self.lanes < 0:
            raise ValueError(f"a cost model needs row_s > 0 and no negative cost or lanes, got {self}")

    def layer_time(self, seconds: Sequence[float]) -> float:
        """A layer's expert time from each group's seconds: the slowest group, and where the groups
        share fewer lanes than there are groups, their compute (what is not a message) over the lanes."""
        return max(max(seconds), self._shared(seconds))

    def ideal_time(self, seconds: Sequence[float]) -> float:
        """What `layer_time` would be with the same work spread evenly over the groups."""
        return max(sum(seconds) / len(seconds), self._shared(seconds))

    def _shared(self, seconds: Sequence[float]) -> float:
        if not self.lanes or self.lanes >= len(seconds):
            return 0.0
        return (sum(seconds) - self.message_s * sum(s > 0 for s in seconds)) / self.lanes

    def units(self) -> tuple[int, int]:
        """(weights, message) in units of 1/ROW_UNITS of a row."""
        return round(self.weight_s / self.row_s * ROW_UNITS), round(self.message_s / self.row_s * ROW_UNITS)

    def group_seconds(self, rows: Sequence[int]) -> float:
        """One group's seconds for a layer, from the rows of each expert it computes."""
        active = [n for n in rows if n > 0]
        return (self.message_s if active else 0.0) + len(active) * self.weight_s + sum(active) * self.row_s

    def as_dict(self) -> dict[str, float | str]:
        return {"weight_s": self.weight_s, "row_s": self.row_s, "message_s": self.message_s, "lanes": self.lanes,
                "source": self.source}  # fmt: skip


def fitted_line(xs: list[int], ys: list[float]) -> tuple[float, float]:
    """(intercept, slope) of the least-squares line through the points, the intercept at least 0
    and the slope at least 1e-9 s (a row always costs something)."""
    slope = max(statistics.linear_regression(xs, ys).slope, 1e-9)
    return max(statistics.fmean(ys) - slope * statistics.fmean(xs), 0.0), slope  # through the means


TOKENS = ExpertCost(weight_s=0.0, row_s=1.0, source="tokens")  # rows only: balance pair counts


def layer_seconds(
    shares: Sequence[Sequence[int]], holders: Sequence[Sequence[int]], num_groups: int, cost: ExpertCost
) -> list[float]:
    """Per group, its seconds for one layer, from the rows each expert's holders take."""
    rows: list[list[int]] = [[] for _ in range(num_groups)]
    for share, held in zip(shares, holders, strict=True):
        for n, g in zip(share, held, strict=True):
            rows[g].append(n)
    return [cost.group_seconds(r) for r in rows]


def split_pairs(
    counts: Sequence[int], holders: Sequence[Sequence[int]], num_groups: int, cost: ExpertCost = TOKENS
) -> tuple[list[list[int]], list[int]]:
    """How one step's (token, expert) pairs of a layer split over the groups holding each expert, so
    that the layer's time under `cost` (`ExpertCost.layer_time`: the slowest group, or the total
    over shared lanes) is as short as it can be.

    `counts[e]`: pairs routed to expert e; `holders[e]`: the groups holding it. Returns per expert
    the pairs each of its holders takes (in `holders` order), and the pairs per group.

    Computed by the compiled split (`protocol/csrc/expert_split.cpp`, the same algorithm) where it
    is built and the sizes fit it, by `split_pairs_python` otherwise: the same answer either way."""
    module = compiled_split()
    if module is None or num_groups > COMPILED_MAX_GROUPS:
        return split_pairs_python(counts, holders, num_groups, cost)
    weight, message = cost.units()
    try:
        shares, per_group = module.split_pairs(counts, holders, num_groups, weight, message, cost.lanes, ROW_UNITS,
                                               SEARCH_BUDGET)  # fmt: skip
    except ValueError:  # more replicated experts with pairs than its masks hold, or a bad holder table
        return split_pairs_python(counts, holders, num_groups, cost)
    return shares, per_group


@functools.lru_cache(maxsize=1)
def compiled_split() -> Any | None:
    """The compiled split's module, built on first use on a machine (a few seconds; later processes
    load it at once), or None where it cannot be built (the Python split serves then)."""
    return compiled.load(SPLIT_SOURCE, "mixtral_expert_split", ["-O3"], [], "the compiled expert split")


def _per_group(shares: Sequence[Sequence[int]], holders: Sequence[Sequence[int]], num_groups: int) -> list[int]:
    per_group = [0] * num_groups
    for share, held in zip(shares, holders, strict=True):
        for n, g in zip(share, held, strict=True):
            per_group[g] += n
    return per_group


def split_pairs_python(
    counts: Sequence[int], holders: Sequence[Sequence[int]], num_groups: int, cost: ExpertCost = TOKENS
) -> tuple[list[list[int]], list[int]]:
    """`split_pairs` in Python: the reference the compiled split follows step for step."""
    weight, message = cost.units()
    base = [0] * num_groups  # units of what must go where it goes: experts with one holder
    used = [False] * num_groups
    for e, h in enumerate(holders):
        if len(h) == 1 and counts[e] > 0:
            base[h[0]] += weight + ROW_UNITS * counts[e]
            used[h[0]] = True
    replicated = sorted((e for e, h in enumerate(holders) if len(h) > 1 and counts[e] > 0),
                        key=lambda e: (-counts[e], e))  # fmt: skip
    shares = [[counts[e] if len(h) == 1 else 0 for _ in h] for e, h in enumerate(holders)]
    if replicated:
        need = [counts[e] for e in replicated]
        choices = [[g for g in holders[e]] for e in replicated]
        allowed, slowest = _Search(need, choices, base, used, weight, message, num_groups, cost.lanes).best()
        fixed = _charges(allowed, base, used, weight, message)
        rows = _flow(need, allowed, [max(0, (slowest - f) // ROW_UNITS) for f in fixed])
        for e, by_group in zip(replicated, rows, strict=True):
            shares[e] = [by_group.get(g, 0) for g in holders[e]]
    return shares, _per_group(shares, holders, num_groups)


def _charges(allowed: Sequence[Sequence[int]], base: Sequence[int], used: Sequence[bool], weight: int,
             message: int) -> list[int]:  # fmt: skip
    """Per group, its units before rows of replicated experts: fixed experts, one weight read per
    replicated expert allowed there, the message if it gets anything."""
    fixed = list(base)
    gets = list(used)
    for groups in allowed:
        for g in groups:
            fixed[g] += weight
            gets[g] = True
    return [f + (message if got else 0) for f, got in zip(fixed, gets, strict=True)]


def _least_slowest(allowed: Sequence[Sequence[int]], need: Sequence[int], fixed: Sequence[int],
                   paying: Sequence[bool], sets: Sequence[int] | None = None) -> int:  # fmt: skip
    """The least slowest group (units) with each replicated expert's rows on the groups allowed it:
    by Hall's condition, the largest over sets X of experts of the least T at which the groups
    allowed X take X's rows, floor((T - fixed[g]) / ROW_UNITS) each. `sets`: the sets X to try (bit
    masks of experts; default the connected ones of `allowed`)."""
    slowest = max((f for f, p in zip(fixed, paying, strict=True) if p), default=0)
    masks = [sum(1 << g for g in groups) for groups in allowed]
    for subset in _connected_sets(tuple(masks)) if sets is None else sets:
        groups_mask, rows = 0, 0
        for i, (mask, n) in enumerate(zip(masks, need, strict=True)):
            if subset >> i & 1:
                groups_mask |= mask
                rows += n
        levels = [fixed[g] for g in range(len(fixed)) if groups_mask >> g & 1]
        slowest = max(slowest, _rows_fit_at(levels, rows))
    return slowest


@functools.lru_cache(maxsize=1024)
def _connected_sets(masks: tuple[int, ...]) -> tuple[int, ...]:
    """Every non-empty set of experts (a bit mask over `masks`, each expert's groups as a bit mask)
    whose experts are connected through shared groups."""
    q = len(masks)
    adjacent = [sum(1 << j for j in range(q) if j != i and masks[i] & masks[j]) for i in range(q)]
    out = []
    for subset in range(1, 1 << q):
        seen = frontier = subset & -subset
        while frontier:
            i = (frontier & -frontier).bit_length() - 1
            frontier &= frontier - 1
            new = adjacent[i] & subset & ~seen
            seen |= new
            frontier |= new
        if seen == subset:
            out.append(subset)
    return tuple(out)


def _rows_fit_at(levels: Sequence[int], rows: int) -> int:
    """The least T with sum over levels of floor((T - level) / ROW_UNITS), taken where positive, >= rows:
    the rows-th smallest of the values level + k * ROW_UNITS (k >= 1). The water level of the
    continuous problem first (no smaller T can do), then the thresholds the floors still lack."""
    v = sorted(levels)
    total, prefix = ROW_UNITS * rows, 0
    for j, x in enumerate(v, 1):
        prefix += x
        if j == len(v) or total + prefix <= v[j] * j:
            break
    t = -(-(total + prefix) // j)  # ceil of the water level over the j lowest
    deficit = rows - sum(max(0, (t - x) // ROW_UNITS) for x in v)
    if deficit <= 0:
        return t
    nxt = sorted(x + ROW_UNITS * (max(0, (t - x) // ROW_UNITS) + 1) for x in v)  # each level's next step
    return nxt[deficit - 1]


def _level(levels: Sequence[int], units: int) -> int:
    """The least integer T with sum over levels of max(0, T - level) >= units: the water level."""
    v = sorted(levels)
    prefix = 0
    for j, x in enumerate(v, 1):
        prefix += x
        if j == len(v) or units + prefix <= v[j] * j:
            return -(-(units + prefix) // j)
    return v[0]  # no levels: not reached (every expert has a holder)


class _Search:
    """Branch and bound over which holders compute each replicated expert (largest first), from the
    allowed sets of a greedy split as the first bound; gives up proving after `budget` nodes (the
    best found stands, `proven` says whether it is the optimum)."""

    def __init__(self, need: list[int], choices: list[list[int]], base: list[int], used: list[bool], weight: int,
                 message: int, num_groups: int, lanes: int, budget: int = SEARCH_BUDGET) -> None:  # fmt: skip
        self.need, self.choices, self.base, self.used = need, choices, base, used
        self.weight, self.message, self.num_groups = weight, message, num_groups
        self.lanes = lanes if 0 < lanes < num_groups else 0  # 0: groups do not share
        self.subsets = [[list(s) for k in range(1, len(c) + 1) for s in itertools.combinations(c, k)] for c in choices]
        self.masks = [sum(1 << g for g in c) for c in choices]
        # Connected under every holder the experts may use: a superset of those connected under any choice.
        self.sets = _connected_sets(tuple(self.masks))
        self.connected = bytearray(1 << len(choices))
        for subset in self.sets:
            self.connected[subset] = 1
        self.best_allowed = self._greedy()
        self.best_cost = self._value(self.best_allowed)
        self.nodes, self.budget, self.proven = 0, budget, True

    def _fixed(self, allowed: Sequence[Sequence[int]]) -> tuple[list[int], list[bool]]:
        fixed = _charges(allowed, self.base, self.used, self.weight, self.message)
        paying = [u or any(g in a for a in allowed) for g, u in enumerate(self.used)]
        return fixed, paying

    def _greedy(self) -> list[list[int]]:
        """Each expert, largest first, on the k least loaded of its holders, the k whose even fill
        leaves the slowest of them least."""
        load = [b + (self.message if u else 0) for b, u in zip(self.base, self.used, strict=True)]
        gets = list(self.used)
        allowed = []
        for n, groups in zip(self.need, self.choices, strict=True):
            by_load = sorted(groups, key=lambda g: (load[g] + (0 if gets[g] else self.message), g))
            best: tuple[int, list[int]] | None = None
            for k in range(1, len(by_load) + 1):
                levels = [load[g] + self.weight + (0 if gets[g] else self.message) for g in by_load[:k]]
                t = _rows_fit_at(levels, n)
                if best is None or t < best[0]:
                    best = (t, by_load[:k])
            assert best is not None
            t, chosen = best
            for g in chosen:
                level = load[g] + self.weight + (0 if gets[g] else self.message)
                load[g] = max(level, min(t, level + ROW_UNITS * n))
                gets[g] = True
            allowed.append(chosen)
        return allowed

    def best(self) -> tuple[list[list[int]], int]:
        """The allowed holders of each expert, and the least layer time (units) they reach."""
        if self.best_cost > self._floor():  # otherwise the greedy split is already the optimum
            self._descend([])
        return self.best_allowed, self.best_cost

    def _value(self, allowed: Sequence[Sequence[int]]) -> int:
        """The least layer time with these allowed holders: Hall's value, and with shared lanes the
        groups' compute (every allowed holder paying its weights) over the lanes."""
        fixed, paying = self._fixed(allowed)
        value = _least_slowest(allowed, self.need, fixed, paying, self.sets)
        if self.lanes:  # messages are waits, not work on the shared lanes
            compute = sum(fixed) - self.message * sum(paying) + ROW_UNITS * sum(self.need)
            value = max(value, -(-compute // self.lanes))
        return value

    def _floor(self) -> int:
        """A lower bound on any split (`_bound` with nothing decided)."""
        return self._bound([])

    def _bound(self, chosen: list[list[int]]) -> int:
        """A lower bound on every completion of `chosen` (the first experts' allowed holders): the
        groups' fixed work, and for every set X of experts the level at which the groups allowed X
        absorb X's rows and one weight read per undecided expert of X, splitting freely (a
        relaxation of Hall's condition: no floors, undecided experts allowed every holder)."""
        k = len(chosen)
        fixed, paying = self._fixed(chosen)
        bound = max((f for f, p in zip(fixed, paying, strict=True) if p), default=0)
        masks = [sum(1 << g for g in groups) for groups in chosen] + self.masks[k:]
        units = [ROW_UNITS * n + (self.weight if i >= k else 0) for i, n in enumerate(self.need)]
        q, connected = len(self.need), self.connected
        union, total = [0] * (1 << q), [0] * (1 << q)
        most: dict[int, int] = {}  # groups -> the most units of a connected set that has just them
        for subset in range(1, 1 << q):  # every set's groups and units from a smaller one's
            low = (subset & -subset).bit_length() - 1
            rest = subset & (subset - 1)
            union[subset], total[subset] = union[rest] | masks[low], total[rest] + units[low]
            if connected[subset] and total[subset] > most.get(union[subset], -1):
                most[union[subset]] = total[subset]
        for groups_mask, units_there in most.items():  # the level rises with the units: the most decides
            levels = [fixed[g] for g in range(self.num_groups) if groups_mask >> g & 1]
            bound = max(bound, _level(levels, units_there))
        if self.lanes:  # all compute, one weight read per undecided expert, over the lanes
            bound = max(bound, -(-(sum(fixed) - self.message * sum(paying) + total[-1]) // self.lanes))
        return bound

    def _descend(self, chosen: list[list[int]]) -> None:
        self.nodes += 1
        k = len(chosen)
        if k == len(self.need):
            cost = self._value(chosen)
            if cost < self.best_cost:
                self.best_cost, self.best_allowed = cost, [list(c) for c in chosen]
            return
        bounded = [(self._bound([*chosen, s]), i, s) for i, s in enumerate(self.subsets[k])]
        for bound, _, subset in sorted(bounded):
            if bound >= self.best_cost:
                break  # sorted: no later one can do better
            if self.nodes >= self.budget:
                self.proven = False
                return
            self._descend([*chosen, subset])


def _flow(need: Sequence[int], allowed: Sequence[Sequence[int]], capacity: list[int]) -> list[dict[int, int]]:
    """Integer rows of each expert on its allowed groups within `capacity` (Hall holds: all fit), by
    augmenting paths through the residual graph of experts -> groups."""
    rows: list[dict[int, int]] = [dict.fromkeys(a, 0) for a in allowed]
    left = list(capacity)
    missing = []
    for e, n in enumerate(need):  # first as far as room goes, roomiest groups first
        for g in sorted(allowed[e], key=lambda g: -left[g]):
            take = min(n, left[g])
            rows[e][g] += take
            left[g] -= take
            n -= take
        missing.append(n)
    for e, n in enumerate(missing):
        while n > 0:  # the rest along paths that move others' rows aside, as many at once as the path allows
            path = _augmenting_path(e, allowed, rows, left)
            assert path is not None, "the least slowest group admits every row"
            amount = min([n, left[path[-1][2]]] + [rows[expert][src] for expert, src, _ in path if src is not None])
            for expert, src, dst in path:  # move rows along the path; the last group takes them
                if src is not None:
                    rows[expert][src] -= amount
                rows[expert][dst] += amount
            left[path[-1][2]] -= amount
            n -= amount
    return rows


def _augmenting_path(start: int, allowed: Sequence[Sequence[int]], rows: list[dict[int, int]],
                     left: list[int]) -> list[tuple[int, int | None, int]] | None:  # fmt: skip
    """Moves (expert, from group or None, to group) that make room for one more row of expert
    `start`: breadth-first from it, through groups that are full, to a group with room left."""
    frontier: list[tuple[int, int | None]] = [(start, None)]
    came: dict[int, tuple[int, int | None]] = {}  # group -> (expert that moves into it, group it leaves)
    while frontier:
        nxt: list[tuple[int, int | None]] = []
        for expert, src in frontier:
            for g in allowed[expert]:
                if g in came or g == src:
                    continue
                came[g] = (expert, src)
                if left[g] > 0:
                    path = []
                    while True:
                        e, s = came[g]
                        path.append((e, s, g))
                        if s is None:
                            return path[::-1]
                        g = s
                for other, g_rows in enumerate(rows):  # a row of another expert leaves g for one of its groups
                    if g_rows.get(g, 0) > 0:
                        nxt.append((other, g))
        frontier = nxt
    return None
