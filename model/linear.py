"""`Linear`: a bias-free projection whose arithmetic is the model's kernels'.

Same parameters and state-dict names as `nn.Linear(bias=False)`, so checkpoints load unchanged;
`forward` is `kernels.linear` (oneDNN or the compiled loop on CPU fp32, `F.linear` elsewhere).
"""

from __future__ import annotations

import torch
from torch import nn

from model.kernels import Kernels, TorchKernels


class Linear(nn.Linear):
    def __init__(self, in_features: int, out_features: int, kernels: Kernels | None = None) -> None:
        super().__init__(in_features, out_features, bias=False)
        self.kernels = kernels or TorchKernels()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., IN] -> [..., OUT]
        return self.kernels.linear(x, (self.weight,))
