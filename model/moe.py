"""Sparse mixture of experts: routing and grouped SwiGLU experts.

Shape legend: T = tokens, H = hidden, I = expert intermediate size, E = experts held,
K = experts per token, N = (token, expert) rows handed to an expert set (T*K in one process).

The gate, `route` and the experts are separate pieces so that the distributed engine can run
them on different workers (router actor: gate + route; expert groups: `ExpertFFN` on a subset
of experts) with exactly the code the single-process model runs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from model import cpu_kernels
from model.config import ModelConfig
from model.linear import Linear, linear

KERNEL_ROWS_PER_EXPERT = 4  # up to this many rows per expert held (on average), `cpu_kernels.expert_ffn`


def route(router_logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Routing weights and expert ids, both [T, K], from gate logits [T, E].

    Softmax over all experts in fp32, top-k, renormalise over the chosen k, cast back to the
    logits' dtype. (Mistral's own top-k-then-softmax is the same function.)
    """
    probs = torch.softmax(router_logits.float(), dim=-1)  # [T, E] fp32
    weights, experts = torch.topk(probs, top_k, dim=-1)  # [T, K], [T, K]
    weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(router_logits.dtype), experts


class ExpertFFN(nn.Module):
    """SwiGLU experts stacked as parameters: w1, w3 [E, I, H] and w2 [E, H, I].

    `expert_ids` are the global ids held here (all of them in one process, a group's subset in
    an expert-group actor); rows are addressed by *local* index into that list.
    """

    def __init__(self, hidden_size: int, intermediate_size: int, expert_ids: Sequence[int]) -> None:
        super().__init__()
        self.expert_ids = list(expert_ids)
        e = len(self.expert_ids)
        self.w1 = nn.Parameter(torch.empty(e, intermediate_size, hidden_size))  # gate_proj
        self.w3 = nn.Parameter(torch.empty(e, intermediate_size, hidden_size))  # up_proj
        self.w2 = nn.Parameter(torch.empty(e, hidden_size, intermediate_size))  # down_proj

    def forward(self, x: torch.Tensor, local_expert: torch.Tensor) -> torch.Tensor:
        """x [N, H], local_expert [N] -> [N, H]: each row through its one expert.

        Rows are sorted by expert and each expert that has rows runs one matmul chain over its
        contiguous slice; no per-token loop. With few rows (a decode step) on CPU in fp32, one
        call of the C++ kernel does all of it, reading each expert's weights once (a layer's
        experts for one token in ~0.13 ms instead of ~0.35 ms of eager ops).
        """
        if len(x) <= KERNEL_ROWS_PER_EXPERT * len(self.expert_ids) and cpu_kernels.usable(x, self.w1):
            kernels = cpu_kernels.load()
            if kernels is not None:
                return kernels.expert_ffn(x.contiguous(), local_expert, self.w1, self.w3, self.w2)
        order = torch.argsort(local_expert, stable=True)  # [N]
        counts = torch.bincount(local_expert, minlength=len(self.expert_ids)).tolist()
        xs = x[order]  # [N, H] grouped by expert
        ys = torch.empty_like(xs)
        start = 0
        for e, n in enumerate(counts):
            if n:
                xe = xs[start : start + n]  # [n, H]
                h = F.silu(linear(xe, self.w1[e])) * linear(xe, self.w3[e])  # [n, I]
                ys[start : start + n] = linear(h, self.w2[e])  # [n, H]
                start += n
        out = torch.empty_like(ys)
        out[order] = ys
        return out


def combine(expert_out: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted sum over each token's k experts: expert_out [T*K, H] (token-major), weights [T, K] -> [T, H]."""
    t, k = weights.shape
    h = expert_out.shape[-1]
    return (expert_out.view(t, k, h) * weights[:, :, None]).sum(dim=1)  # [T, K, H] -> [T, H]


class SparseMoE(nn.Module):
    """Gate + experts. With both (one process) it is the reference the distributed path must
    equal; a router holds only the gate (`experts=()`), an expert group only its experts
    (`gate=False`). `experts=None` means all of them."""

    def __init__(self, config: ModelConfig, gate: bool = True, experts: Sequence[int] | None = None) -> None:
        super().__init__()
        self.top_k = config.experts_per_token
        self.num_experts = config.num_experts
        self.gate = Linear(config.hidden_size, config.num_experts) if gate else None
        ids = range(config.num_experts) if experts is None else experts
        self.experts = ExpertFFN(config.hidden_size, config.intermediate_size, ids) if len(ids) else None

    def forward(self, x: torch.Tensor, expert_counts: torch.Tensor | None = None) -> torch.Tensor:
        """x [T, H] -> [T, H]; adds the tokens routed to each expert into `expert_counts` [E] if given."""
        assert self.gate is not None and self.experts is not None, "a partial MoE block cannot run alone"
        weights, experts = route(self.gate(x), self.top_k)  # [T, K], [T, K]
        if expert_counts is not None:
            expert_counts += torch.bincount(experts.flatten(), minlength=self.num_experts).to(expert_counts)
        rows = x.repeat_interleave(self.top_k, dim=0)  # [T*K, H], token-major like experts.flatten()
        return combine(self.experts(rows, experts.flatten()), weights)
