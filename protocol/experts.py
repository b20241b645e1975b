"""Which group's experts serve a step's tokens: the placement's shape, and how one step's tokens
split over an expert's replicas. Pure; the router runs `split_tokens` each layer, and the engine's
placement (`cluster.placement.place_experts`) predicts with it.
"""

from __future__ import annotations

from collections.abc import Sequence

Placement = tuple[tuple[tuple[int, ...], ...], ...]  # [layer][group] -> experts held, in slot order


def holders(groups: tuple[tuple[int, ...], ...] | list[list[int]], num_experts: int) -> list[list[int]]:
    """[expert] -> the groups holding it, from one layer's [group] -> experts."""
    return [[g for g, ids in enumerate(groups) if e in ids] for e in range(num_experts)]


def split_tokens(
    counts: Sequence[int], holders: Sequence[Sequence[int]], num_groups: int
) -> tuple[list[list[int]], list[int]]:
    """How an expert's (token, expert) pairs of one step split over the groups holding it.

    `counts[e]`: pairs routed to expert e; `holders[e]`: the groups holding it. Experts with one
    holder go there; each replicated expert's pairs then fill its holders' groups, least loaded
    first, as evenly as the pairs allow (water-filling). Returns, per expert, the pairs each of its
    holders takes (in `holders` order), and the pairs per group."""
    group_load = [0] * num_groups
    shares: list[list[int]] = [[0] * len(h) for h in holders]
    for e, h in enumerate(holders):
        if len(h) == 1:
            shares[e][0] = counts[e]
            group_load[h[0]] += counts[e]
    for e in sorted((e for e, h in enumerate(holders) if len(h) > 1), key=lambda e: (-counts[e], e)):
        for i, n in enumerate(_water_fill([group_load[g] for g in holders[e]], counts[e])):
            shares[e][i] = n
            group_load[holders[e][i]] += n
    return shares, group_load


def _water_fill(levels: list[int], amount: int) -> list[int]:
    """Integers adding up to `amount` that raise the lowest `levels` first, evenly."""
    out = [0] * len(levels)
    order = sorted(range(len(levels)), key=lambda i: (levels[i], i))
    left = amount
    for k in range(1, len(order) + 1):  # raise the k lowest to the next level, or as far as `left` goes
        target = levels[order[k]] if k < len(order) else None
        current = levels[order[0]] + out[order[0]]
        need = (target - current) * k if target is not None else None
        if need is None or need >= left:
            each, extra = divmod(left, k)
            for j, i in enumerate(order[:k]):
                out[i] += each + (j < extra)
            return out
        for i in order[:k]:
            out[i] += target - current  # type: ignore[operator]
        left -= need
    return out
