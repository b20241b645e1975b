"""The kernel seam: what layers hand off (projections, a layer's experts, attention, RMSNorm),
chosen once when a model is built for its device and dtype.

Layers hold a `Kernels` object and call it; they never test the device, the dtype or the
environment themselves. `select_kernels(choice, device, dtype)` maps the config's
`engine.kernels` to an implementation:

    torch   plain torch ops, any device and dtype: the reference every other one is tested against
    cpu     CPU float32: oneDNN projections and the project's compiled decode loops
    cuda    CUDA: grouped expert matmuls and Triton paged decode attention, no host reads
    auto    cpu where it applies, else torch (cuda joins it once it has been measured on a GPU)
"""

from __future__ import annotations

import torch

from model.config import KERNEL_CHOICES, KernelChoice
from model.kernels.cpu import CpuKernels
from model.kernels.cuda import CudaKernels
from model.kernels.reference import TorchKernels

Kernels = TorchKernels  # the interface: every implementation subclasses the reference


def select_kernels(choice: KernelChoice, device: torch.device | str, dtype: torch.dtype) -> Kernels:
    """The kernels a model on `device` in `dtype` runs with."""
    kind = torch.device(device).type
    cpu_fp32 = kind == "cpu" and dtype == torch.float32
    if choice == "torch":
        return TorchKernels()
    if choice == "cpu":
        if not cpu_fp32:
            raise ValueError(
                f"kernels 'cpu' run float32 models on the CPU; this one is {dtype} on {kind} "
                "(use kernels 'auto' or 'torch')"
            )
        return CpuKernels.for_this_machine()
    if choice == "cuda":
        if kind != "cuda":
            raise ValueError(f"kernels 'cuda' run models on a GPU; this one is on {kind} (use kernels 'auto')")
        return CudaKernels()
    if choice == "auto":
        return CpuKernels.for_this_machine() if cpu_fp32 else TorchKernels()
    raise ValueError(f"kernels must be one of {', '.join(KERNEL_CHOICES)}, got {choice!r}")


__all__ = ["KERNEL_CHOICES", "CpuKernels", "CudaKernels", "KernelChoice", "Kernels", "TorchKernels", "select_kernels"]
