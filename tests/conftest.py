"""Shared fixtures: seeded tiny checkpoints written once per session, and torch thread pinning.

Without CUDA, Triton runs the GPU kernels' Triton code in its interpreter. Triton reads
TRITON_INTERPRET when it is first imported (its own library functions are decorated then), and
transformers imports it, so the switch is set here, before any test module imports anything.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

if not torch.cuda.is_available():  # torch itself does not import triton
    os.environ.setdefault("TRITON_INTERPRET", "1")

from model import ModelConfig, write_random_checkpoint
from tests.support.common import GRID_BASE

torch.set_num_threads(1)  # tests run beside each other's processes on 2 cores
TIERS = ("unit", "ray", "serve", "hosts", "gpu")  # pyproject.toml's markers


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Each test carries exactly one tier marker (its module's `pytestmark`), so `-m` selects it."""
    for item in items:
        tiers = {m.name for m in item.iter_markers()} & set(TIERS)
        if len(tiers) != 1:
            raise pytest.UsageError(f"{item.nodeid}: mark its module with exactly one of {TIERS}, not {sorted(tiers)}")


@pytest.fixture(scope="session")
def checkpoint_factory(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """make(config=..., seed=..., **writer_kwargs) -> directory, cached per argument set."""
    made: dict[str, Path] = {}

    def make(config: ModelConfig = GRID_BASE, seed: int = 0, **kwargs: Any) -> Path:
        key = f"{config.model_dump_json()}|{seed}|{sorted(kwargs.items())}"
        if key not in made:
            made[key] = write_random_checkpoint(config, tmp_path_factory.mktemp("ckpt"), seed=seed, **kwargs)
        return made[key]

    return make
