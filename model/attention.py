"""Grouped-query attention over packed sequences, with an optional paged KV cache.

Shape legend: T = packed tokens of the call, H = hidden, Hq / Hkv = query / kv heads,
D = head dim, N*B = slots of the paged pool.

Which keys each query sees is the attention plan's business (`model/attention_plan.py`, made
once per forward); the attention arithmetic is the kernels' (`model/kernels`).
"""

from __future__ import annotations

import torch
from torch import nn

from model.attention_plan import AttentionPlan
from model.config import ModelConfig
from model.kernels import Kernels, TorchKernels
from model.linear import Linear
from model.rope import apply_rotary


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, kernels: Kernels | None = None) -> None:
        super().__init__()
        h, d = config.hidden_size, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, d
        self.kernels = kernels or TorchKernels()
        self.q_proj = Linear(h, config.num_heads * d, self.kernels)
        self.k_proj = Linear(h, config.num_kv_heads * d, self.kernels)
        self.v_proj = Linear(h, config.num_kv_heads * d, self.kernels)
        self.o_proj = Linear(config.num_heads * d, h, self.kernels)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        plan: AttentionPlan,
        kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """x [T, H] -> [T, H]; `kv` is this layer's flat pools [N*B, Hkv, D] when a cache is used."""
        t, d, hq, hkv = x.shape[0], self.head_dim, self.num_heads, self.num_kv_heads
        weights = (self.q_proj.weight, self.k_proj.weight, self.v_proj.weight)
        qkv = self.kernels.linear(x, weights).view(t, hq + 2 * hkv, d)  # [T, (Hq + 2 Hkv) D] -> [T, Hq + 2 Hkv, D]
        qk = apply_rotary(qkv[:, : hq + hkv], cos, sin)  # [T, Hq + Hkv, D]: queries and keys rotate alike
        q, k, v = qk[:, :hq], qk[:, hq:], qkv[:, hq + hkv :]  # [T, Hq, D], [T, Hkv, D], [T, Hkv, D]
        if kv is None:
            k_store, v_store = k, v
        else:
            assert plan.write_slots is not None, "a cache needs a plan made with block tables"
            k_store, v_store = kv
            k_store[plan.write_slots] = k
            v_store[plan.write_slots] = v
        out = self.kernels.attention(q, k_store, v_store, plan, d**-0.5)  # [T, Hq, D]
        return self.o_proj(out.view(t, hq * d))
