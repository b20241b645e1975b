"""The MoE data plane between routers and expert groups: sort, exchange, compute, return.

Shape legend: T = tokens at a router, K = experts per token, H = hidden, N = (token, expert)
rows a router sends (T*K) or an expert group receives (sum over routers), P = members of the
router + expert-group sub-group (R routers first, then G groups), E = experts.

Per layer, in the sub-group: (1) `all_to_all_single` of row counts, so each group knows what it
receives; (2) rows router -> groups, each row carrying its expert id in one extra column (exact
in fp32/bf16/fp16 for E <= 256); (3) results groups -> routers, in the order received. Routers
never send to routers, groups never to groups: those splits are zero.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from actors.data_plane import DataPlane
from protocol.expert_cost import ExpertCost, layer_seconds, split_pairs

MAX_EXPERTS_IN_COLUMN = 256  # integers a bf16 column holds exactly


def pair_destinations(
    experts: torch.Tensor, holders: Sequence[Sequence[int]], num_groups: int, cost: ExpertCost
) -> tuple[torch.Tensor, list[int], list[float]]:
    """The group each (token, expert) pair goes to: experts [T, K] -> dest [T*K], pairs per group [G],
    and each group's seconds by the cost model [G].

    An expert held by several groups has its pairs split between them so that the slowest group is
    as fast as `cost` allows (`split_pairs`), in
    token order: the first ones to its first holder, and so on. Per-expert counts are read to the
    host once: the split sizes of the all-to-all follow from them anyway."""
    flat = experts.flatten()  # [N] token-major
    num_experts = len(holders)
    counts = torch.bincount(flat, minlength=num_experts).tolist()  # the layer's one host read
    shares, per_group = split_pairs(counts, holders, num_groups, cost)
    seconds = layer_seconds(shares, holders, num_groups, cost)
    device = flat.device
    if all(len(h) == 1 for h in holders):  # no replicas: one lookup
        primary = torch.tensor([h[0] for h in holders], dtype=torch.long, device=device)  # [E]
        return primary[flat], per_group, seconds
    width = max(len(h) for h in holders)
    group = torch.tensor([list(h) + [h[0]] * (width - len(h)) for h in holders], device=device)  # [E, R]
    ends = torch.tensor([_cumulative(s) + [counts[e]] * (width - len(s)) for e, s in enumerate(shares)],
                        device=device)  # [E, R] end of each holder's range of the expert's pairs  # fmt: skip
    order = torch.argsort(flat, stable=True)  # [N] pairs by expert, token order within each
    starts = torch.tensor(_cumulative(counts), device=device) - torch.tensor(counts, device=device)  # [E]
    rank = torch.empty_like(flat)
    rank[order] = torch.arange(len(flat), device=device) - starts[flat[order]]  # [N] index among its expert's pairs
    replica = (rank[:, None] >= ends[flat]).sum(dim=1)  # [N] which holder's range it falls in
    return group[flat, replica], per_group, seconds


def _cumulative(values: Sequence[int]) -> list[int]:
    out, total = [], 0
    for v in values:
        total += v
        out.append(total)
    return out


def router_exchange(
    x: torch.Tensor,
    experts: torch.Tensor,
    holders: Sequence[Sequence[int]],
    num_routers: int,
    num_groups: int,
    plane: DataPlane,
    cost: ExpertCost,
) -> tuple[torch.Tensor, list[int], list[float]]:
    """Send each (token, expert) pair's row to a group holding its expert; the results [T*K, H],
    token-major, the pairs each group got [G] and its seconds by the cost model [G]."""
    t, k = experts.shape
    h = x.shape[1]
    dest, counts, seconds = pair_destinations(experts, holders, num_groups, cost)  # [N], [G], [G]
    order = torch.argsort(dest, stable=True)  # [N] by destination group
    none = [0] * num_routers
    send_counts = torch.tensor(none + counts, dtype=torch.long, device=x.device)  # [P]
    plane.all_to_all_counts(torch.empty_like(send_counts), send_counts)
    ids = experts.flatten()[order].to(x.dtype)[:, None]  # [N, 1] expert id as a column
    rows = torch.cat([x[order // k], ids], dim=1).contiguous()  # [N, H+1] sorted by group
    p = num_routers + num_groups
    plane.all_to_all(x.new_empty(0, h + 1), rows, [0] * p, none + counts)
    back = x.new_empty(t * k, h)  # [N, H] results in the order sent
    plane.all_to_all(back, x.new_empty(0, h), none + counts, [0] * p)
    out = torch.empty_like(back)
    out[order] = back  # un-permute to token-major pairs
    return out, counts, seconds


def group_exchange(
    hidden_size: int,
    dtype: torch.dtype,
    device: torch.device,
    num_routers: int,
    num_groups: int,
    plane: DataPlane,
    compute: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> int:
    """An expert group's side of one layer: receive rows, `compute(x [N, H], expert_ids [N])`, return them.

    Returns the number of rows processed."""
    p = num_routers + num_groups
    got = torch.empty(p, dtype=torch.long, device=device)
    plane.all_to_all_counts(got, torch.zeros(p, dtype=torch.long, device=device))
    from_routers = got[:num_routers].tolist()  # the one host read of a layer: the split sizes
    n = sum(from_routers)
    rows = torch.empty(n, hidden_size + 1, dtype=dtype, device=device)  # [N, H+1]
    plane.all_to_all(rows, rows.new_empty(0, hidden_size + 1), from_routers + [0] * num_groups, [0] * p)
    y = compute(rows[:, :hidden_size], rows[:, hidden_size].long()).contiguous()  # [N, H]
    plane.all_to_all(y.new_empty(0, hidden_size), y, [0] * p, from_routers + [0] * num_groups)
    return n
