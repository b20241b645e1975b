"""CPU fp32 kernels: oneDNN for projections, the project's C++ loops for decode-sized work.

Shape legend: N = rows (tokens), IN / OUT = features, E = experts held, H = hidden,
S = sequences of a decode group, Hq / Hkv = query / kv heads, D = head dim, P = key slots.

Projections. On CPU in fp32, `F.linear` goes to MKL's sgemm. On x86 CPUs that are not Intel's
(the AMD EPYC machines this project is developed and tested on), MKL takes a slower code path:
it reads a [1024, 512] weight at ~17 GB/s at one row and multiplies at ~190 GFLOP/s at 512 rows
on two cores, where oneDNN's fp32 kernels (the ones `torch.compile` emits for CPU linears) reach
~36 GB/s and ~460 GFLOP/s on the same weights. Both are exact fp32 GEMMs; only the summation
order differs. oneDNN builds and caches a kernel per input shape (~0.6 MB each), and the row
count of a projection changes every step: unbounded, a worker grew by hundreds of MB as it met
new row counts. So rows are cut into tiles of at most ROW_TILE, and each tile is padded to one
of 32 row counts (`padded_rows`): a fixed set of shapes per weight, at most ~20 MB of kernels,
for at most ~1/4 extra work on a tile (~1/10 typically). A 256-row tile runs at ~97% of the
rate of one large GEMM.

Decode-sized work. With at most KERNEL_ROWS rows (a decode step at small batch) the compiled
matrix-vector loop runs instead: each weight row is read once, at about twice oneDNN's speed
for a 2 MB weight at one row (30 vs 59 us); from 8 rows on oneDNN's blocked GEMM is faster. A
layer's experts at a few rows per expert take one compiled call (~0.13 ms instead of ~0.35 ms of
eager ops), and one-query attention reads the paged pool in place instead of gathering it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch

from model.attention_plan import AttentionGroup
from model.kernels import compiled
from model.kernels.reference import TorchKernels, joined

KERNEL_ROWS = 4  # up to this many rows, the compiled `rows_linear`
KERNEL_ROWS_PER_EXPERT = 5  # an expert with up to this many rows: the compiled `expert_ffn` (measured: faster to 5)
ROW_TILE = 256  # rows per oneDNN call; larger inputs run as several tiles

_HAS_ONEDNN: bool = torch.backends.mkldnn.is_available()  # type: ignore[no-untyped-call]
_ONEDNN_LINEAR = getattr(torch.ops.mkldnn, "_linear_pointwise", None) if _HAS_ONEDNN else None

Path = Literal["compiled", "onednn", "torch"]


class CpuKernels(TorchKernels):
    """For models on the CPU in float32. `module` is the compiled extension (`for_this_machine`
    builds it); None keeps oneDNN for projections and torch for the rest."""

    name = "cpu"

    def __init__(self, module: Any | None) -> None:
        self.compiled: Any = module

    @classmethod
    def for_this_machine(cls) -> CpuKernels:
        """With the C++ loops compiled for this CPU (once per machine), if they can be built."""
        return cls(compiled.build())

    def path_for(self, x: torch.Tensor, weights: Sequence[torch.Tensor]) -> Path:
        """Which kernel projects `x` [..., IN] through `weights`: the compiled loop at few rows,
        oneDNN at more, `F.linear` for anything that needs gradients or is malformed."""
        if not _fp32_inference(x, *weights) or any(w.is_sparse or w.shape[1] != x.shape[-1] for w in weights):
            return "torch"
        if x.numel() and x.numel() <= KERNEL_ROWS * x.shape[-1] and self.compiled is not None:
            return "compiled"
        return "onednn" if _ONEDNN_LINEAR is not None and x.numel() else "torch"

    def linear(self, x: torch.Tensor, weights: Sequence[torch.Tensor]) -> torch.Tensor:
        path = self.path_for(x, weights)
        if path == "torch":
            return super().linear(x, weights)
        rows = x.reshape(-1, x.shape[-1]).contiguous()  # [N, IN]
        if path == "compiled":
            y = self.compiled.rows_linear(rows, [w.contiguous() for w in weights])  # [N, OUT]
        else:
            y = joined([_onednn(rows, w.contiguous()) for w in weights], dim=-1)  # [N, OUT]
        return y.view(*x.shape[:-1], y.shape[-1])

    def experts(
        self, x: torch.Tensor, local_expert: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor
    ) -> torch.Tensor:
        """Each expert's rows on the kernel that is faster for as many rows: the compiled loop for an
        expert with at most KERNEL_ROWS_PER_EXPERT, oneDNN's matmuls for one with more."""
        if self.compiled is None or not len(x) or not _fp32_inference(x, w1):
            return super().experts(x, local_expert, w1, w3, w2)
        few = torch.bincount(local_expert, minlength=w1.shape[0]) <= KERNEL_ROWS_PER_EXPERT  # [E]
        if bool(few.all()):
            return self.compiled.expert_ffn(x.contiguous(), local_expert, w1, w3, w2)  # [N, H]
        looped = few[local_expert]  # [N] rows whose expert has few
        if not bool(looped.any()):
            return super().experts(x, local_expert, w1, w3, w2)
        out = torch.empty_like(x)  # [N, H]
        rows, rest = looped.nonzero().squeeze(1), (~looped).nonzero().squeeze(1)  # [n], [N - n]
        out[rows] = self.compiled.expert_ffn(x[rows].contiguous(), local_expert[rows], w1, w3, w2)
        out[rest] = super().experts(x[rest], local_expert[rest], w1, w3, w2)
        return out

    def decode_attention(
        self, q: torch.Tensor, k_store: torch.Tensor, v_store: torch.Tensor, group: AttentionGroup, scale: float
    ) -> torch.Tensor:
        if self.compiled is None or group.key_lens is None or not _fp32_inference(q, k_store):
            return super().decode_attention(q, k_store, v_store, group, scale)
        group = group.as_slots()
        # [P, Hkv, D] pools read in place (a cache layer's view is contiguous already)
        k_pool, v_pool = k_store.contiguous(), v_store.contiguous()
        return self.compiled.decode_attention(q, k_pool, v_pool, group.k_index, group.key_lens, scale)  # [S, Hq, D]


def _fp32_inference(*tensors: torch.Tensor) -> bool:
    """CPU fp32 tensors, no autograd: what oneDNN's inference op and the compiled loops take."""
    return all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors) and not (
        torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    )


def _onednn(rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """rows [N, IN] -> [N, OUT] in tiles of at most ROW_TILE rows."""
    return joined([_onednn_rows(rows[i : i + ROW_TILE], weight) for i in range(0, rows.shape[0], ROW_TILE)], dim=0)


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
