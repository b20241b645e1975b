"""Dense projections y = x W^T on the fastest kernel for where the weights live.

Shape legend: N = rows (tokens), IN = input features, OUT = output features.

On CPU in fp32, `F.linear` goes to MKL's sgemm. On x86 CPUs that are not Intel's (the AMD EPYC
machines this project is developed and tested on), MKL takes a slower code path: it reads a
[1024, 512] weight at ~17 GB/s at one row and multiplies at ~190 GFLOP/s at 512 rows on two
cores, where oneDNN's fp32 kernels (the ones `torch.compile` emits for CPU linears) reach ~36 GB/s
and ~460 GFLOP/s on the same weights. Both are exact fp32 GEMMs; only the summation order differs.
So CPU fp32 projections run on oneDNN; every other device and dtype, and anything that needs
gradients, keeps `F.linear`.

oneDNN builds and caches a kernel per input shape (~0.6 MB each), and the row count of a
projection changes every step (tokens in the step, rows routed to an expert): unbounded, a worker
grew by hundreds of MB as it met new row counts. So rows are cut into tiles of at most ROW_TILE,
and each tile is padded to one of 32 row counts (`padded_rows`): a fixed set of shapes per
weight, at most ~20 MB of kernels, for at most ~1/4 extra work on a tile (~1/10 typically: the
time of a tile grows with its rows from a fixed cost of reading the weight). A 256-row tile runs
at ~97% of the rate of one large GEMM.

With at most KERNEL_ROWS rows (a decode step at small batch) the project's own matrix-vector
kernel (`model/cpu_kernels.py`) runs instead: each weight row is read once, at about twice
oneDNN's speed for a 2 MB weight at one row (30 vs 59 us); from 8 rows on oneDNN's blocked GEMM
is faster.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from model import cpu_kernels

KERNEL_ROWS = 4  # up to this many rows, `cpu_kernels.rows_linear`
ROW_TILE = 256  # rows per oneDNN call; larger inputs run as several tiles

_HAS_ONEDNN: bool = torch.backends.mkldnn.is_available()  # type: ignore[no-untyped-call]
_ONEDNN_LINEAR = getattr(torch.ops.mkldnn, "_linear_pointwise", None) if _HAS_ONEDNN else None


Path = Literal["kernel", "onednn", "torch"]


def path_for(x: torch.Tensor, *weights: torch.Tensor) -> Path:
    """Which kernel projects `x` [..., IN] through `weights`: ours at few rows, oneDNN at more
    (CPU fp32 inference both), `F.linear` for everything else."""
    if not cpu_kernels.usable(x, *weights) or any(w.is_sparse or w.shape[1] != x.shape[-1] for w in weights):
        return "torch"
    if x.numel() and x.numel() <= KERNEL_ROWS * x.shape[-1] and cpu_kernels.load() is not None:
        return "kernel"
    return "onednn" if _ONEDNN_LINEAR is not None and x.numel() else "torch"


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [..., IN], weight [OUT, IN] -> [..., OUT] (no bias)."""
    return linear_cat(x, (weight,))


def linear_cat(x: torch.Tensor, weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """x [..., IN] through each weight [OUT_j, IN], side by side: [..., OUT_0 + OUT_1 + ...].

    Projections of the same input (q, k and v) take one kernel call at few rows."""
    path = path_for(x, *weights)
    if path == "torch":
        return _joined([F.linear(x, w) for w in weights], dim=-1)
    rows = x.reshape(-1, x.shape[-1]).contiguous()  # [N, IN]
    if path == "kernel":
        kernels = cpu_kernels.load()
        assert kernels is not None
        y = kernels.rows_linear(rows, [w.contiguous() for w in weights])  # [N, OUT]
    else:
        y = _joined([_onednn(rows, w.contiguous()) for w in weights], dim=-1)  # [N, OUT]
    return y.view(*x.shape[:-1], y.shape[-1])


def _onednn(rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """rows [N, IN] -> [N, OUT] in tiles of at most ROW_TILE rows."""
    return _joined([_onednn_rows(rows[i : i + ROW_TILE], weight) for i in range(0, rows.shape[0], ROW_TILE)], dim=0)


def _joined(parts: list[torch.Tensor], dim: int) -> torch.Tensor:
    """torch.cat, without its copy when there is one part."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


def padded_rows(n: int) -> int:
    """The row count a tile of 1 <= `n` <= ROW_TILE rows runs at: `n` itself up to 16, then
    rounded up to a multiple of 4 (to 32), 8 (to 64), 16 (to 128) or 32 (to 256)."""
    if n <= 16:
        return n
    step = 4 if n <= 32 else 8 if n <= 64 else 16 if n <= 128 else 32
    return -(-n // step) * step


def _onednn_rows(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [n, IN] with n <= ROW_TILE -> [n, OUT], computed on `padded_rows(n)` rows."""
    assert _ONEDNN_LINEAR is not None
    n, b = x.shape[0], padded_rows(x.shape[0])
    if b == n:
        x = x.contiguous()
    else:
        x = torch.cat([x, x.new_zeros(b - n, x.shape[1])])  # [b, IN]
    return _ONEDNN_LINEAR(x, weight, None, "none", [], "")[:n]  # [b, OUT] -> [n, OUT]


class Linear(nn.Linear):
    """`nn.Linear` without bias whose forward is `linear`: same parameters and state-dict names."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight)
