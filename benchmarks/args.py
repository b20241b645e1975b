"""Command-line options of `mixtral-cluster bench` and `soak`, importable without the bench extra.

`cluster/cli.py` builds its `--help` from these; the benchmarks themselves (transformers, httpx,
matplotlib) are imported only when one runs.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from model.config import DTYPE_NAMES, KERNEL_CHOICES, preset_names

BENCH_DESCRIPTION = (
    "Measure, side by side in one run: transformers vs the single-process engine vs the cluster "
    "(throughput), structured outputs vs free, HTTP serving latency, the cluster's step breakdown and the "
    "memory-bandwidth roofline. "
    "Writes JSON, Markdown and PNG plots with --json."
)
SOAK_DESCRIPTION = (
    "A bounded soak of the Serve app (tiny model by default): waves of streamed, non-streamed and abandoned "
    "requests; fails if KV blocks, memory or actors grow or a greedy answer changes."
)
QUICK = {"prompts": 8, "new_tokens": 16, "max_len": 128, "requests_per_client": 2, "decode_batch": 8, "repeats": 1,
         "roofline_rounds": 3, "prefix_len": 512, "roofline_batch": 8, "skewed_rounds": 1}  # fmt: skip
FULL = {"prompts": 32, "new_tokens": 64, "max_len": 512, "requests_per_client": 4, "decode_batch": 16, "repeats": 2,
        "roofline_rounds": 8, "prefix_len": 2000, "roofline_batch": 32, "skewed_rounds": 3}  # fmt: skip


def bench_parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = p or argparse.ArgumentParser(prog="mixtral-cluster bench", description=BENCH_DESCRIPTION)
    p.add_argument("--checkpoint", type=Path, help="a checkpoint directory (default: a seeded --preset one)")
    p.add_argument("--preset", default="mini", choices=preset_names(), help="model shape when no checkpoint (mini)")
    p.add_argument("--cache-dir", type=Path, default=Path("checkpoints"), help="where seeded checkpoints are kept")
    p.add_argument("--quick", action="store_true", help="a few minutes on 2 cores: 8 prompts x 16 tokens, <=128 long")
    p.add_argument("--prompts", type=int, help="number of prompts (default 32; quick 8)")
    p.add_argument("--new-tokens", type=int, help="tokens generated per prompt (default 64; quick 16)")
    p.add_argument("--min-len", type=int, default=8, help="shortest prompt (default 8)")
    p.add_argument("--max-len", type=int, help="longest prompt (default 512; quick 128)")
    p.add_argument("--layout", type=int, nargs=3, default=[1, 1, 2], metavar=("A", "R", "G"),
                   help="cluster layout: attention shards, routers, expert groups (default 1 1 2)")  # fmt: skip
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16], help="client counts (default 1 4 16)")
    p.add_argument("--dtype", default="float32", choices=DTYPE_NAMES)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--transport", choices=["nccl", "gloo"],
                   help="the cluster's data plane (default: nccl on cuda, gloo on cpu); gloo on cuda puts the "
                   "whole copy on one GPU")  # fmt: skip
    p.add_argument("--kernels", default="auto", choices=KERNEL_CHOICES,
                   help="the engine's kernels (default auto: the compiled CPU loops on CPU float32)")  # fmt: skip
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="torch threads of this process (transformers and the single-process engine)")  # fmt: skip
    p.add_argument("--skip", nargs="*", default=[],
                   choices=["hf", "latency", "roofline", "prefix", "skewed", "structured", "cluster"],
                   help="parts to leave out; 'cluster' leaves out every part that starts workers (the cluster's "
                   "throughput and breakdown, skewed, latency)")  # fmt: skip
    p.add_argument("--json", type=Path, help="write the results here, with .md and .png files beside it")
    return p


def soak_parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = p or argparse.ArgumentParser(prog="mixtral-cluster soak", description=SOAK_DESCRIPTION)
    p.add_argument("--minutes", type=float, default=10.0, help="how long to run (default 10)")
    p.add_argument("--checkpoint", type=Path, help="a checkpoint directory (default: a seeded tiny one)")
    p.add_argument("--cache-dir", type=Path, default=Path("checkpoints"), help="where seeded checkpoints are kept")
    p.add_argument("--layout", type=int, nargs=3, default=[1, 1, 2], metavar=("A", "R", "G"))
    p.add_argument("--concurrency", type=int, default=12, help="requests in flight per wave (default 12)")
    p.add_argument("--json", type=Path, help="write the per-wave records here")
    return p
