"""The reference kernels: plain torch ops, on any device and dtype.

Shape legend: N = rows (tokens), IN / OUT = features, E = experts held, H = hidden,
I = expert intermediate size, T = packed tokens, Hq / Hkv = query / kv heads, D = head dim,
S = sequences of an attention group, Tq / Tk = queries / keys per sequence, P = key slots.

Every other implementation (`CpuKernels`, `CudaKernels`) subclasses this one, overrides what it
does faster, and is tested against it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from model.attention_plan import AttentionGroup, AttentionPlan


class TorchKernels:
    """What a layer hands off: projections, a layer's experts, attention over a plan, RMSNorm."""

    name = "torch"

    def linear(self, x: torch.Tensor, weights: Sequence[torch.Tensor]) -> torch.Tensor:
        """x [..., IN] through each weight [OUT_j, IN], side by side: [..., OUT_0 + OUT_1 + ...].

        Projections of the same input (q, k and v) come as one call so a kernel may fuse them."""
        return joined([F.linear(x, w) for w in weights], dim=-1)

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """[..., H] -> [..., H], computed in fp32 whatever the activation dtype (as the reference does)."""
        if x.dtype == torch.float32 and weight.dtype == torch.float32:
            # The same arithmetic in one fused op (bitwise equal in fp32; in lower precisions the
            # reference rounds to the activation dtype before the weight, which this op does not).
            return F.rms_norm(x, weight.shape, weight, eps)
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        return weight * x32.to(dtype)

    def experts(
        self, x: torch.Tensor, local_expert: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor
    ) -> torch.Tensor:
        """x [N, H], local_expert [N] (index into the stacked weights) -> [N, H]: each row through
        its one SwiGLU expert, w2(silu(w1 x) * w3 x), with w1, w3 [E, I, H] and w2 [E, H, I].

        Rows are sorted by expert and each expert that has rows runs one matmul chain over its
        contiguous slice; no per-token loop."""
        order = torch.argsort(local_expert, stable=True)  # [N]
        counts = torch.bincount(local_expert, minlength=w1.shape[0]).tolist()
        xs = x[order]  # [N, H] grouped by expert
        ys = torch.empty_like(xs)
        start = 0
        for e, n in enumerate(counts):
            if n:
                xe = xs[start : start + n]  # [n, H]
                h = F.silu(self.linear(xe, (w1[e],))) * self.linear(xe, (w3[e],))  # [n, I]
                ys[start : start + n] = self.linear(h, (w2[e],))  # [n, H]
                start += n
        out = torch.empty_like(ys)
        out[order] = ys
        return out

    def attention(
        self, q: torch.Tensor, k_store: torch.Tensor, v_store: torch.Tensor, plan: AttentionPlan, scale: float
    ) -> torch.Tensor:
        """Queries q [T, Hq, D] against keys and values [P, Hkv, D] as `plan` says -> [T, Hq, D]."""
        out = torch.empty_like(q)
        for g in plan.groups:
            if g.key_lens is not None:  # one query per sequence
                rows = g.q_rows[:, 0]  # [S]
                out[rows] = self.decode_attention(q[rows], k_store, v_store, g, scale)
            else:
                out[g.q_rows] = self.group_attention(q[g.q_rows], k_store, v_store, g, scale)
        return out

    def decode_attention(
        self, q: torch.Tensor, k_store: torch.Tensor, v_store: torch.Tensor, group: AttentionGroup, scale: float
    ) -> torch.Tensor:
        """One query per sequence: q [S, Hq, D] -> [S, Hq, D]; each sees its first `key_lens` keys."""
        return self.group_attention(q[:, None], k_store, v_store, group.as_slots(), scale)[:, 0]

    def group_attention(
        self, q: torch.Tensor, k_store: torch.Tensor, v_store: torch.Tensor, group: AttentionGroup, scale: float
    ) -> torch.Tensor:
        """q [S, Tq, Hq, D] -> [S, Tq, Hq, D] over the group's keys, through SDPA."""
        qg = q.transpose(1, 2)  # [S, Hq, Tq, D]
        kg = k_store[group.k_index].transpose(1, 2)  # [S, Tk, Hkv, D] -> [S, Hkv, Tk, D]
        vg = v_store[group.k_index].transpose(1, 2)  # [S, Tk, Hkv, D] -> [S, Hkv, Tk, D]
        mask = None if group.mask is None else group.mask[:, None]  # [S, 1, Tq, Tk]
        og = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=mask, scale=scale, enable_gqa=True)
        return og.transpose(1, 2)  # [S, Hq, Tq, D] -> [S, Tq, Hq, D]


def joined(parts: list[torch.Tensor], dim: int) -> torch.Tensor:
    """torch.cat, without its copy when there is one part."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)
