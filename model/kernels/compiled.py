"""Building the project's C++ loops for CPU decode steps (`model/csrc/small_rows.cpp`).

Shape legend: N = input rows, IN / OUT = features, E = experts held, H = hidden, I = expert
intermediate size.

At batch 1 a decode step is a chain of matrix-vector products, and on CPU their time is the
weight bytes over the read bandwidth plus a fixed cost per call. oneDNN takes ~56 us for a 2 MB
weight at one row on this project's 2-core machines, where a plain loop that reads each weight
row once takes ~30 us; a layer's SwiGLU experts are ~20 eager ops, and attention for one query
per sequence is a gather, SDPA and a scatter. The C++ file holds three plain loops the compiler
vectorises for the host CPU: `rows_linear` (x W^T for a few rows, several weights side by side),
`expert_ffn` (a layer's experts for a few rows in two parallel regions) and `decode_attention`
(one query per sequence against its keys in the paged pool). They accumulate in fp32 like
torch's kernels, in a different order.

The extension is built with torch's JIT builder (g++ and ninja) into torch's extension cache,
keyed by the source (its text and path), the CPU's feature flags and the torch version, the first time a process
asks for it (~20 s; later processes load it at once). `CpuKernels` asks for it when a model is
built; where it cannot be built, `build()` returns None and the CPU kernels keep oneDNN and
torch for everything. `load` is the builder itself, also used for the routers' expert split
(`protocol/csrc/expert_split.cpp`).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).resolve().parent.parent / "csrc" / "small_rows.cpp"


@functools.lru_cache(maxsize=1)
def build() -> Any | None:
    """The compiled module (`rows_linear`, `expert_ffn`, `decode_attention`), or None if it cannot
    be built here (no compiler, no ninja, a read-only cache); once per process."""
    logger.info("loading the CPU decode kernels (compiled on first use on a machine, ~20 s)")
    return load(SOURCE, "mixtral_small_rows", ["-O3", "-march=native", "-fopenmp"], ["-fopenmp"], "CPU decode kernels")


def load(source: Path, name: str, cflags: list[str], ldflags: list[str], what: str) -> Any | None:
    """`source` built with torch's JIT builder into its extension cache under `name` and a key of
    the source, its path, the CPU's flags and torch's version, and imported; None (and a warning
    naming `what`) where it cannot be built."""
    from torch.utils import cpp_extension

    text = source.read_bytes()
    # The source's path too: torch's builder rebuilds a name whose build file names another source, so
    # two checkouts on one machine sharing a key would rebuild each other's extension every time.
    identity = text + str(source).encode() + _cpu_flags().encode() + torch.__version__.encode()
    key = hashlib.sha256(identity).hexdigest()[:12]
    try:
        module = cpp_extension.load(
            name=f"{name}_{key}", sources=[str(source)], extra_cflags=cflags, extra_ldflags=ldflags, verbose=False
        )
    except Exception as e:  # the callers keep a path without it
        logger.warning("%s unavailable (%s: %s); using the fallback", what, type(e).__name__, e)
        return None
    logger.debug("%s loaded (%s)", what, key)
    return module


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return os.uname().machine
