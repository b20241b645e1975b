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
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ROW_TILE = 256  # rows per oneDNN call; larger inputs run as several tiles

_HAS_ONEDNN: bool = torch.backends.mkldnn.is_available()  # type: ignore[no-untyped-call]
_ONEDNN_LINEAR = getattr(torch.ops.mkldnn, "_linear_pointwise", None) if _HAS_ONEDNN else None


def _use_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        _ONEDNN_LINEAR is not None
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and not weight.is_sparse
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
    )


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [..., IN], weight [OUT, IN] -> [..., OUT] (no bias)."""
    if not _use_onednn(x, weight) or x.shape[-1] != weight.shape[1] or x.numel() == 0:
        return F.linear(x, weight)
    lead = x.shape[:-1]
    rows = x.reshape(-1, x.shape[-1])  # [N, IN]
    w = weight.contiguous()
    tiles = [_onednn_rows(rows[i : i + ROW_TILE], w) for i in range(0, rows.shape[0], ROW_TILE)]
    y = tiles[0] if len(tiles) == 1 else torch.cat(tiles)  # [N, OUT]
    return y.view(*lead, weight.shape[0])


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
