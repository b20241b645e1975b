"""A driver run on a test host (`python -m tests.hosts.copy_driver ...` inside the head's namespace): joins
the Ray cluster at `--address`, starts a model copy of the given layout, generates greedily and
prints one JSON line: the outputs and where each worker ran (its node's IP and the data plane's
network interface)."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from cluster.engine.request import SamplingParams
from cluster.llm import LLM


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--address", required=True)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--layout", type=int, nargs=3, required=True)
    p.add_argument("--prompts", required=True, help="JSON list of token-id lists")
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--resources", default="{}", help="JSON: each worker's bundle")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    a, r, g = args.layout
    with LLM(args.checkpoint, attention_shards=a, routers=r, expert_groups=g, ray_address=args.address,
             placement_strategy="SPREAD", worker_resources=json.loads(args.resources) or None,
             placement_timeout_s=120.0) as llm:  # fmt: skip
        outs = llm.generate(json.loads(args.prompts), SamplingParams(max_tokens=args.max_tokens, temperature=0.0,
                                                                     ignore_eos=True))  # fmt: skip
        where = llm.backend.reports("where")
    report = {
        "tokens": [o.token_ids for o in outs],
        "where": {name: {"node_ip": w["node_ip"], "interface": w["interface"]} for name, w in where.items()},
    }
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
