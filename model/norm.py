"""RMSNorm, computed in fp32 whatever the activation dtype (as the reference does)."""

from __future__ import annotations

import torch
from torch import nn

from model.kernels import Kernels, TorchKernels


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float, kernels: Kernels | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps
        self.kernels = kernels or TorchKernels()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., H] -> [..., H]
        return self.kernels.rms_norm(x, self.weight, self.eps)
