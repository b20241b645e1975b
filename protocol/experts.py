"""Which group's experts serve a step's tokens: the placement's shape. Pure. How one step's
tokens split over an expert's replicas is `protocol.expert_cost.split_pairs`.
"""

from __future__ import annotations

from collections.abc import Sequence

Placement = tuple[tuple[tuple[int, ...], ...], ...]  # [layer][group] -> experts held, in slot order
AnyPlacement = Sequence[Sequence[Sequence[int]]]  # the same as lists, as a caller may write it


class PlacementError(ValueError):
    """A layout or placement that cannot exist, or cannot fit the cluster it was asked to run on."""


def holders(groups: tuple[tuple[int, ...], ...] | list[list[int]], num_experts: int) -> list[list[int]]:
    """[expert] -> the groups holding it, from one layer's [group] -> experts."""
    return [[g for g, ids in enumerate(groups) if e in ids] for e in range(num_experts)]
