"""The control plane of a running copy's decode steps: what the engine spends around its workers.

    python -m benchmarks.control_plane [--seqs 64] [--context 1000] [--runs 2]

A tiny copy on Ray (A=1 R=1 G=2, torch kernels) decodes `--seqs` sequences of `--context`-token
prompts with `LLM.profile` on. For each full decode step (every sequence in it) the control plane
is the engine's wall time minus the slowest attention shard's own step: scheduling, building and
sending the step's messages, Ray's calls and detokenising, which is what per-role delta messages
cut. The figures are medians over those steps, one line per run. Only the public API is used
(`LLM`, `SamplingParams`, `LLM.profile`), so the same file times an older checkout side by side:
`PYTHONPATH=<checkout> python benchmarks/control_plane.py` from that checkout.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

from benchmarks.report import write_json
from cluster import LLM, SamplingParams
from model.config import ModelConfig
from protocol.config import ensure_checkpoint

logger = logging.getLogger("mixtral_cluster.control_plane")


def full_decode_steps(profile: dict[str, Any], seqs: int) -> list[dict[str, float]]:
    """Per decode step with all `seqs` sequences in it: the engine's wall, the backend's part and
    the slowest shard's own step, in milliseconds (`LLM.step_profile()`'s records)."""
    shards = [v for k, v in profile["workers"].items() if k.startswith("attention")]
    rows = []
    for i, rec in enumerate(profile["engine"]):
        if not rec["decode"] or rec["seqs"] != seqs:
            continue
        shard = max(s[i]["total"] for s in shards if "total" in s[i])
        rows.append({"step": 1e3 * rec["wall"], "backend": 1e3 * rec["execute"], "shard": 1e3 * shard,
                     "control": 1e3 * max(rec["wall"] - shard, 0.0)})  # fmt: skip
    return rows


def run(seqs: int, context: int, new_tokens: int, runs: int, cache_dir: Path) -> list[dict[str, float]]:
    ckpt = ensure_checkpoint(cache_dir / "tiny-seed0", "tiny", seed=0)
    vocab = ModelConfig.from_checkpoint(ckpt).vocab_size
    g = torch.Generator().manual_seed(0)
    prompts = [[1, *torch.randint(3, vocab, (context - 1,), generator=g).tolist()] for _ in range(seqs)]
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    out = []
    with LLM(ckpt, attention_shards=1, routers=1, expert_groups=2, kernels="torch", block_size=16,
             max_seqs=seqs, max_batched_tokens=max(2048, seqs)) as llm:  # fmt: skip
        # Warm: first calls, kernels, and every prompt in the prefix cache, so that each timed run
        # goes straight to decoding all the sequences together.
        llm.generate(prompts, SamplingParams(max_tokens=1))
        for r in range(runs):
            llm.profile(True)
            llm.generate(prompts, params)
            rows = full_decode_steps(llm.step_profile(), seqs)
            llm.profile(False)
            figures = {k: statistics.median(row[k] for row in rows) for k in ("control", "backend", "step")}
            figures["steps"] = len(rows)
            logger.info("run %d: %d full decode steps | control plane %.2f ms | backend %.2f ms | step %.2f ms",
                        r + 1, len(rows), figures["control"], figures["backend"], figures["step"])  # fmt: skip
            out.append(figures)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.control_plane", description=__doc__.split("\n\n")[0])
    p.add_argument("--seqs", type=int, default=64, help="decoding sequences; default 64")
    p.add_argument("--context", type=int, default=1000, help="prompt tokens of each; default 1000")
    p.add_argument("--new-tokens", type=int, default=40, help="tokens each generates; default 40")
    p.add_argument("--runs", type=int, default=2, help="generate calls timed on one copy; default 2")
    p.add_argument("--cache-dir", type=Path, default=Path("checkpoints"), help="where the tiny checkpoint is kept")
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logger.setLevel(logging.INFO)
    figures = run(args.seqs, args.context, args.new_tokens, args.runs, args.cache_dir)
    write_json(args.json, figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
