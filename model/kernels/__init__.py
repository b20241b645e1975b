"""The kernel seam: what layers hand off (projections, a layer's experts, attention, RMSNorm),
chosen once when a model is built for its device and dtype.

Layers hold a `Kernels` object and call it; they never test the device, the dtype or the
environment themselves. `select_kernels(choice, device, dtype)` maps the config's
`engine.kernels` to an implementation:

    torch   plain torch ops, any device and dtype: the reference every other one is tested against
    cpu     CPU float32: oneDNN projections and the project's compiled decode loops
    auto    cpu where it applies, else torch
"""

from __future__ import annotations

from typing import Literal

import torch

from model.kernels.cpu import CpuKernels
from model.kernels.reference import TorchKernels

Kernels = TorchKernels  # the interface: every implementation subclasses the reference
KernelChoice = Literal["auto", "torch", "cpu"]
KERNEL_CHOICES: tuple[KernelChoice, ...] = ("auto", "torch", "cpu")


def select_kernels(choice: KernelChoice, device: torch.device | str, dtype: torch.dtype) -> Kernels:
    """The kernels a model on `device` in `dtype` runs with."""
    cpu_fp32 = torch.device(device).type == "cpu" and dtype == torch.float32
    if choice == "torch":
        return TorchKernels()
    if choice == "cpu":
        if not cpu_fp32:
            raise ValueError(
                f"kernels 'cpu' run float32 models on the CPU; this one is {dtype} on {torch.device(device).type} "
                "(use kernels 'auto' or 'torch')"
            )
        return CpuKernels.for_this_machine()
    if choice == "auto":
        return CpuKernels.for_this_machine() if cpu_fp32 else TorchKernels()
    raise ValueError(f"kernels must be one of {', '.join(KERNEL_CHOICES)}, got {choice!r}")


__all__ = ["KERNEL_CHOICES", "CpuKernels", "KernelChoice", "Kernels", "TorchKernels", "select_kernels"]
