"""What the routers' split costs per layer (`protocol.expert_cost.split_pairs`), on this CPU.

    python -m benchmarks.split_cost
    python -m benchmarks.split_cost --groups 8 --redundant 8 --pairs 256 8192 --json out.json

For each expert-group layout (E=8 experts over `--groups` groups with `--redundant` extra slots,
placed as `rebalance` places them for a skewed load) and each step size (`--pairs` (token,
expert) pairs in a layer: 256 is a 128-sequence decode step at top-2), the split's time per layer
over `--steps` random skewed loads: median and worst, under the 8x22B cost model of DESIGN.md
(weights 210 us, a row 0.6 us, a message 25 us), with how many experts were replicated.
"""

from __future__ import annotations

import argparse
import logging
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.report import write_json
from cluster.backend.placement import initial_placement, place_experts
from protocol.expert_cost import ExpertCost, split_pairs
from protocol.experts import holders

logger = logging.getLogger("mixtral_cluster.split_cost")

MIXTRAL_8X22B = ExpertCost(weight_s=210e-6, row_s=0.6e-6, message_s=25e-6, source="8x22B on H100 (DESIGN.md)")
SKEW = [0.3, 0.2, 0.1, 0.1, 0.1, 0.1, 0.05, 0.05]  # the share of pairs each expert draws


def _load(pairs: int, rng: random.Random) -> list[int]:
    counts = [0] * len(SKEW)
    for e in rng.choices(range(len(SKEW)), weights=SKEW, k=pairs):
        counts[e] += 1
    return counts


def measure(groups: int, redundant: int, pairs: int, steps: int, seed: int = 0) -> dict[str, Any]:
    rng = random.Random(seed)
    slots = [len(g) for g in initial_placement(len(SKEW), groups, redundant)]
    placed = place_experts([float(s) for s in SKEW], slots)
    held = holders(placed, len(SKEW))
    times = []
    for _ in range(steps):
        counts = _load(pairs, rng)
        began = time.perf_counter()
        split_pairs(counts, held, groups, MIXTRAL_8X22B)
        times.append(time.perf_counter() - began)
    return {"groups": groups, "redundant": redundant, "pairs": pairs, "replicated": sum(len(h) > 1 for h in held),
            "median_us": 1e6 * statistics.median(times), "max_us": 1e6 * max(times)}  # fmt: skip


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.split_cost", description=__doc__.split("\n\n")[0])
    p.add_argument("--groups", type=int, nargs="+", default=[4, 8], help="expert groups (default 4 8)")
    p.add_argument("--redundant", type=int, nargs="+", default=[4, 8], help="redundant slots (default 4 8)")
    p.add_argument("--pairs", type=int, nargs="+", default=[256, 8192], help="pairs per layer (default 256 8192)")
    p.add_argument("--steps", type=int, default=50, help="random loads per case (default 50)")
    p.add_argument("--json", type=Path, help="also write the figures here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rows = [measure(g, r, n, args.steps) for g in args.groups for r in args.redundant for n in args.pairs]
    for row in rows:
        logger.info("G=%d, %d redundant slots (%d experts replicated), %d pairs: %.0f us per layer (worst %.0f us)",
                    row["groups"], row["redundant"], row["replicated"], row["pairs"], row["median_us"],
                    row["max_us"])  # fmt: skip
    write_json(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
