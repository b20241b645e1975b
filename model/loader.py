"""Filling modules from a checkpoint, with every tensor accounted for.

A module's parameter names are the canonical names without `model.`, experts stacked:
`model.layers.3.block_sparse_moe.experts.5.w1.weight` fills row `slot(5)` of the parameter
`layers.3.block_sparse_moe.experts.w1`. Modules are built on the meta device and materialised
on the target device, so no random initialisation is paid for and no CPU copy is made first.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from model.checkpoint import Checkpoint, CheckpointError, weight_names
from model.kernels import KernelChoice, Kernels, TorchKernels, select_kernels
from model.mixtral import Mixtral

logger = logging.getLogger(__name__)

_EXPERT = re.compile(r"^(layers\.\d+\.block_sparse_moe\.experts)\.(\d+)\.(w[123])\.weight$")


def param_target(name: str, expert_slot: Callable[[int], int] = lambda e: e) -> tuple[str, int | None]:
    """(parameter name, row or None) that canonical tensor `name` fills."""
    short = name.removeprefix("model.")
    m = _EXPERT.match(short)
    if m:
        return f"{m.group(1)}.{m.group(3)}", expert_slot(int(m.group(2)))
    return short, None


def materialise(module: nn.Module, device: torch.device | str, dtype: torch.dtype) -> None:
    """Each parameter of `module` (built on the meta device) made an empty one of `dtype` on `device`:
    what `to_empty` then `to(dtype)` do, without their path through meta tensors. That path runs
    torch's Python reference ops, whose first use imports torch's compiler stack (sympy, dynamo):
    ~1-2 s of CPU in each process that loads a model, every worker of every copy."""
    for sub in module.modules():
        for name, p in list(sub.named_parameters(recurse=False)):
            kind = dtype if p.is_floating_point() else p.dtype
            setattr(sub, name, nn.Parameter(torch.empty(p.shape, device=device, dtype=kind), p.requires_grad))


def load_into(
    module: nn.Module,
    checkpoint: Checkpoint,
    names: Sequence[str],
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    expert_slot: Callable[[int], int] = lambda e: e,
    progress: bool | None = None,
) -> nn.Module:
    """Materialise `module` (built on the meta device) on `device` and fill it from `names`.

    Every parameter must be filled exactly once: a parameter (or expert row) left empty, or a
    name filling nothing, is an error naming it.
    """
    materialise(module, device, dtype)
    params = dict(module.named_parameters())
    filled: dict[str, set[int | None]] = {p: set() for p in params}
    for name, tensor in checkpoint.read(names, device=device, dtype=dtype, progress=progress):
        target, row = param_target(name, expert_slot)
        if target not in params:
            raise CheckpointError(f"tensor {name} has no parameter {target} to fill in {type(module).__name__}")
        if row in filled[target]:
            raise CheckpointError(f"tensor {name} fills {target} row {row}, which was already loaded")
        with torch.no_grad():
            (params[target] if row is None else params[target][row]).copy_(tensor)
        filled[target].add(row)
    for pname, p in params.items():
        want = {None} if pname.rsplit(".", 1)[-1] == "weight" else set(range(p.shape[0]))
        if filled[pname] != want:
            raise CheckpointError(
                f"parameter {pname} of {type(module).__name__} was not fully loaded from {checkpoint.path}"
            )
    module.requires_grad_(False)
    return module


def load_model(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    progress: bool | None = None,
    kernels: KernelChoice | Kernels = "auto",
) -> Mixtral:
    """The whole model from a checkpoint directory (HF or Mistral layout), in eval mode, running
    on the `kernels` chosen for its device and dtype (`model.kernels.select_kernels`), or on the
    `Kernels` object given (the tests run the GPU kernels on CPU that way).

    The checkpoint must hold exactly the model's tensors: a missing one, or one nobody loads,
    is an error.
    """
    checkpoint = Checkpoint(path)
    names = weight_names(checkpoint.config)
    unused = sorted(checkpoint.names - set(names))
    if unused:
        raise CheckpointError(
            f"checkpoint {checkpoint.path} has {len(unused)} tensors that no part of the model loads, e.g. "
            f"{', '.join(unused[:3])} (does its config match the weights?)"
        )
    # the CPU loops compile here, not in a first step
    chosen = kernels if isinstance(kernels, TorchKernels) else select_kernels(kernels, device, dtype)
    with torch.device("meta"):
        model = Mixtral(checkpoint.config, kernels=chosen)
    load_into(model, checkpoint, names, device=device, dtype=dtype, progress=progress)
    logger.info("loaded %s parameters from %s (%s layout)", checkpoint.config.num_parameters, path, checkpoint.layout)
    return model.eval()
