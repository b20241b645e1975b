"""What the routers' split costs per layer (`protocol.expert_cost.split_pairs`), on this CPU:
the compiled split beside the Python reference, on the same loads.

    python -m benchmarks.split_cost
    python -m benchmarks.split_cost --groups 8 16 --redundant 8 --pairs 256 8192 --json out.json

For each expert-group layout (E=8 experts over `--groups` groups with `--redundant` extra slots,
placed as `rebalance` places them for a skewed load; with more groups than experts, the slots
spread evenly) and each step size (`--pairs` (token, expert) pairs in a layer: 256 is a
128-sequence decode step at top-2), the split's time per layer over `--steps` random skewed
loads: median and worst of each, under the 8x22B cost model of DESIGN.md (weights 210 us, a row
0.6 us, a message 25 us), with how many experts were replicated and whether both gave the same
split on every load.
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
from cluster.backend.placement import initial_placement
from cluster.engine.expert_planner import place_experts
from protocol.expert_cost import ExpertCost, compiled_split, split_pairs, split_pairs_python
from protocol.experts import holders

logger = logging.getLogger("mixtral_cluster.split_cost")

MIXTRAL_8X22B = ExpertCost(weight_s=210e-6, row_s=0.6e-6, message_s=25e-6, source="8x22B on H100 (DESIGN.md)")
SKEW = [0.3, 0.2, 0.1, 0.1, 0.1, 0.1, 0.05, 0.05]  # the share of pairs each expert draws


def _load(pairs: int, rng: random.Random) -> list[int]:
    counts = [0] * len(SKEW)
    for e in rng.choices(range(len(SKEW)), weights=SKEW, k=pairs):
        counts[e] += 1
    return counts


def _slots(groups: int, redundant: int) -> list[int]:
    if groups <= len(SKEW):
        return [len(g) for g in initial_placement(len(SKEW), groups, redundant)]
    total = len(SKEW) + redundant  # more groups than experts: one expert's slot or more each
    if total < groups:
        raise ValueError(f"{groups} groups need at least {groups - len(SKEW)} redundant slots")
    return [total // groups + (i < total % groups) for i in range(groups)]


def measure(groups: int, redundant: int, pairs: int, steps: int, seed: int = 0) -> dict[str, Any]:
    rng = random.Random(seed)
    placed = place_experts([float(s) for s in SKEW], _slots(groups, redundant))
    held = holders(placed, len(SKEW))
    times: dict[str, list[float]] = {"compiled": [], "python": []}
    same = True
    for _ in range(steps):
        counts = _load(pairs, rng)
        splits = []
        for name, split in (("compiled", split_pairs), ("python", split_pairs_python)):
            began = time.perf_counter()
            splits.append(split(counts, held, groups, MIXTRAL_8X22B))
            times[name].append(time.perf_counter() - began)
        same = same and splits[0] == splits[1]
    row: dict[str, Any] = {"groups": groups, "redundant": redundant, "pairs": pairs,
                           "replicated": sum(len(h) > 1 for h in held), "same_split": same}  # fmt: skip
    for name, ts in times.items():
        row[f"{name}_median_us"], row[f"{name}_max_us"] = 1e6 * statistics.median(ts), 1e6 * max(ts)
    return row


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.split_cost", description=__doc__.split("\n\n")[0])
    p.add_argument("--groups", type=int, nargs="+", default=[4, 8, 16], help="expert groups (default 4 8 16)")
    p.add_argument("--redundant", type=int, nargs="+", default=[4, 8], help="redundant slots (default 4 8)")
    p.add_argument("--pairs", type=int, nargs="+", default=[256, 8192], help="pairs per layer (default 256 8192)")
    p.add_argument("--steps", type=int, default=50, help="random loads per case (default 50)")
    p.add_argument("--json", type=Path, help="also write the figures here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if compiled_split() is None:
        logger.warning("the compiled split could not be built here: both columns are the Python split")
    cases = [(g, r) for g in args.groups for r in args.redundant if len(SKEW) + r >= g]  # a slot for each group
    rows = [measure(g, r, n, args.steps) for g, r in cases for n in args.pairs]
    for row in rows:
        logger.info("G=%d, %d redundant slots (%d experts replicated), %d pairs: compiled %.0f us per layer "
                    "(worst %.0f), Python %.0f us (worst %.0f), %s", row["groups"], row["redundant"],
                    row["replicated"], row["pairs"], row["compiled_median_us"], row["compiled_max_us"],
                    row["python_median_us"], row["python_max_us"],
                    "the same split" if row["same_split"] else "DIFFERENT SPLITS")  # fmt: skip
    write_json(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
