"""Sparse mixture of experts: routing and grouped SwiGLU experts.

Shape legend: T = tokens, H = hidden, I = expert intermediate size, E = experts held,
K = experts per token, N = (token, expert) rows handed to an expert set (T*K in one process).

The gate, `route` and the experts are separate pieces so that the distributed engine can run
them on different workers: `SparseMoE` takes the expert computation as a call, which is its own
experts in one process and the all-to-all exchange with the expert groups in a router actor;
an expert group runs `ExpertFFN` on the subset of experts it holds. Same code, either way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from model.config import ModelConfig
from model.kernels import Kernels, TorchKernels
from model.linear import Linear

ExpertsCall = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""(x [T, H], expert ids [T, K]) -> each (token, expert) pair's expert output [T*K, H], token-major."""


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

    def __init__(
        self, hidden_size: int, intermediate_size: int, expert_ids: Sequence[int], kernels: Kernels | None = None
    ) -> None:
        super().__init__()
        self.expert_ids = list(expert_ids)
        self.kernels = kernels or TorchKernels()
        e = len(self.expert_ids)
        self.w1 = nn.Parameter(torch.empty(e, intermediate_size, hidden_size))  # gate_proj
        self.w3 = nn.Parameter(torch.empty(e, intermediate_size, hidden_size))  # up_proj
        self.w2 = nn.Parameter(torch.empty(e, hidden_size, intermediate_size))  # down_proj

    def forward(self, x: torch.Tensor, local_expert: torch.Tensor) -> torch.Tensor:
        """x [N, H], local_expert [N] -> [N, H]: each row through its one expert."""
        return self.kernels.experts(x, local_expert, self.w1, self.w3, self.w2)


def combine(expert_out: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted sum over each token's k experts: expert_out [T*K, H] (token-major), weights [T, K] -> [T, H]."""
    t, k = weights.shape
    h = expert_out.shape[-1]
    return (expert_out.view(t, k, h) * weights[:, :, None]).sum(dim=1)  # [T, K, H] -> [T, H]


class SparseMoE(nn.Module):
    """Gate + experts. With both (one process) it is the reference the distributed path must
    equal; a router holds only the gate (`experts=()`) and passes the exchange with the expert
    groups as `experts` to `forward`; an expert group holds only its experts (`gate=False`).
    `experts=None` means all of them."""

    def __init__(
        self,
        config: ModelConfig,
        gate: bool = True,
        experts: Sequence[int] | None = None,
        kernels: Kernels | None = None,
    ) -> None:
        super().__init__()
        kernels = kernels or TorchKernels()
        self.top_k = config.experts_per_token
        self.num_experts = config.num_experts
        self.gate = Linear(config.hidden_size, config.num_experts, kernels) if gate else None
        ids = range(config.num_experts) if experts is None else experts
        self.experts = ExpertFFN(config.hidden_size, config.intermediate_size, ids, kernels) if len(ids) else None

    def forward(
        self,
        x: torch.Tensor,
        expert_counts: torch.Tensor | None = None,
        experts: ExpertsCall | None = None,
        count_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x [T, H] -> [T, H]; adds the tokens routed to each expert into `expert_counts` [E] if given,
        each token `count_weights` [T] times (default once).

        `experts` computes the chosen experts' outputs; by default the experts held here."""
        assert self.gate is not None, "an MoE block without its gate cannot route"
        weights, ids = route(self.gate(x), self.top_k)  # [T, K], [T, K]
        if expert_counts is not None:
            flat = ids.flatten()  # [T*K] index_add, not bincount: bincount reads its input's max back from a GPU
            if count_weights is None:
                added = torch.ones_like(flat, dtype=expert_counts.dtype)
            else:
                added = count_weights.to(expert_counts.dtype).repeat_interleave(self.top_k)  # [T*K]
            expert_counts.index_add_(0, flat, added)
        return combine((experts or self.local_experts)(x, ids), weights)

    def local_experts(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The experts held here: x [T, H], ids [T, K] -> [T*K, H] token-major."""
        assert self.experts is not None, "this MoE block holds no experts; pass the call that reaches them"
        rows = x.repeat_interleave(self.top_k, dim=0)  # [T*K, H], token-major like ids.flatten()
        return self.experts(rows, ids.flatten())
