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

from collections.abc import Callable

import torch

from actors.data_plane import DataPlane

MAX_EXPERTS_IN_COLUMN = 256  # integers a bf16 column holds exactly


def dispatch_order(experts: torch.Tensor, group_of: torch.Tensor, num_groups: int) -> tuple[torch.Tensor, list[int]]:
    """Pairs sorted by destination group: order [T*K] over token-major pairs, and rows per group [G]."""
    dest = group_of[experts.flatten()]  # [T*K]
    order = torch.argsort(dest, stable=True)  # [T*K]
    counts = torch.bincount(dest, minlength=num_groups).tolist()
    return order, counts


def router_exchange(
    x: torch.Tensor,
    experts: torch.Tensor,
    group_of: torch.Tensor,
    num_routers: int,
    num_groups: int,
    plane: DataPlane,
) -> torch.Tensor:
    """Send each (token, expert) pair's row to its expert's group; the results [T*K, H], token-major."""
    t, k = experts.shape
    h = x.shape[1]
    order, counts = dispatch_order(experts, group_of, num_groups)
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
    return out


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
