"""`mixtral-cluster bench`: throughput, serving latency, step breakdown and roofline in one run.

    mixtral-cluster bench --quick --json bench/quick.json
    mixtral-cluster bench --json bench/full.json                    # the BENCHMARKS.md figures
    mixtral-cluster bench --checkpoint /path/to/ckpt --layout 2 1 4

Every figure comes from this one run on one checkpoint (default: the `mini` preset, seeded random
weights), so ratios are measured side by side. The JSON holds everything; a Markdown table and
PNG plots are written next to it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks import breakdown, latency, report, roofline, throughput
from benchmarks.workload import ensure_checkpoint, mixed_prompts
from cluster.llm import LLM, resolve_dtype
from cluster.placement import Layout
from model.config import ModelConfig, preset_names

logger = logging.getLogger("mixtral_cluster.bench")

QUICK = {"prompts": 8, "new_tokens": 16, "max_len": 128, "requests_per_client": 2, "decode_batch": 8, "repeats": 1,
         "roofline_rounds": 3}  # fmt: skip
FULL = {"prompts": 32, "new_tokens": 64, "max_len": 512, "requests_per_client": 4, "decode_batch": 16, "repeats": 2,
        "roofline_rounds": 8}  # fmt: skip


def build_parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = p or argparse.ArgumentParser(prog="mixtral-cluster bench", description=__doc__.split("\n\n")[0])
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
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="torch threads of this process (transformers and the single-process engine)")  # fmt: skip
    p.add_argument("--skip", nargs="*", default=[], choices=["hf", "latency", "roofline"], help="parts to leave out")
    p.add_argument("--json", type=Path, help="write the results here, with .md and .png files beside it")
    return p


def run(args: argparse.Namespace) -> dict[str, Any]:
    size = QUICK if args.quick else FULL
    n_prompts = args.prompts or size["prompts"]
    new_tokens = args.new_tokens or size["new_tokens"]
    max_len = args.max_len or size["max_len"]
    torch.set_num_threads(args.threads)
    dtype = resolve_dtype(args.dtype)
    ckpt = ensure_checkpoint(args.checkpoint, args.preset, args.cache_dir)
    config = ModelConfig.from_checkpoint(ckpt)
    layout = Layout(*args.layout)
    prompts = mixed_prompts(n_prompts, args.min_len, max_len, config.vocab_size)
    kv_bytes = 1 << 30
    result: dict[str, Any] = {
        "setup": {
            "command": "mixtral-cluster bench " + shlex.join(sys.argv[2:] if sys.argv[1:2] == ["bench"] else []),
            "checkpoint": str(ckpt), "preset": None if args.checkpoint else args.preset,
            "parameters": config.num_parameters, "dtype": args.dtype, "device": args.device,
            "prompts": n_prompts, "new_tokens": new_tokens, "min_len": args.min_len, "max_len": max_len,
            "layout": list(args.layout), "threads": args.threads, "cpus": os.cpu_count(), "torch": torch.__version__,
        },
        "throughput_tok_s": {},
        "throughput_seconds": {},
        "agreement": {},
    }  # fmt: skip
    runs: dict[str, throughput.Run] = {}

    if "hf" not in args.skip:
        logger.info("transformers generate: %d prompts x %d tokens", n_prompts, new_tokens)
        runs["hf"] = throughput.on_own_thread(
            lambda: throughput.run_hf(ckpt, prompts, new_tokens, dtype, args.device, size["repeats"])
        )
        result["hf_prefill_seconds"] = runs["hf"].prefill_seconds

    logger.info("single-process engine")
    with LLM(ckpt, single_process=True, dtype=dtype, device=args.device, kv_cache_bytes=kv_bytes) as single:
        runs["single"] = throughput.run_engine(single, prompts, new_tokens, size["repeats"])
        single.profile(True)  # where the single-process run's time goes: prefill vs decode steps
        single.generate(prompts, throughput.greedy(new_tokens))
        steps = single.step_profile()["engine"]
        single.profile(False)
        result["single_steps"] = {
            "prefill_seconds": sum(r["wall"] for r in steps if not r["decode"]),
            "decode_seconds": sum(r["wall"] for r in steps if r["decode"]),
            "prefill_steps": sum(not r["decode"] for r in steps), "decode_steps": sum(r["decode"] for r in steps),
        }  # fmt: skip
        if "roofline" not in args.skip:
            logger.info("roofline: batch-1 decode against the memory bandwidth")
            itemsize = torch.empty((), dtype=dtype).element_size()
            nbytes = roofline.decode_bytes(config, itemsize)
            result["roofline"] = roofline.paired_rounds(
                single,
                prompts[0][:32],
                nbytes,
                lambda: throughput.on_own_thread(lambda: roofline.memory_bandwidth(device=args.device)),
                size["roofline_rounds"],
                max(new_tokens, 32),
            )

    import ray

    logger.info("cluster A=%d R=%d G=%d", *args.layout)
    torch.set_num_threads(1)  # this process only drives the engine now; the workers compute
    a, r, g = args.layout
    with LLM(ckpt, a, r, g, device=args.device, dtype=dtype, kv_cache_bytes=kv_bytes) as cluster:
        runs["cluster"] = throughput.run_engine(cluster, prompts, new_tokens, size["repeats"])
        logger.info("cluster decode-step breakdown")
        batch = mixed_prompts(size["decode_batch"], 16, 16, config.vocab_size, seed=1)  # one prefill step, then decode
        cluster.generate(batch[:1], throughput.greedy(2))
        cluster.profile(True)
        cluster.generate(batch, throughput.greedy(new_tokens))
        result["breakdown"] = breakdown.decode_breakdown(cluster.step_profile())
        cluster.profile(False)
    raw = breakdown.raw_collectives_ms(config, layout, size["decode_batch"], dtype, args.device)
    per_layer = result["breakdown"]["data_plane_median"] / config.num_layers  # medians, as the raw figure
    result["collectives"] = {"data_plane_per_layer_ms": per_layer, "raw_per_layer_ms": raw, "ratio": per_layer / raw}

    for name, r in runs.items():
        result["throughput_tok_s"][name] = r.tokens_per_s()
        result["throughput_seconds"][name] = r.seconds
    for name in ("hf", "cluster"):
        if name in runs:
            result["agreement"][f"single vs {name}"] = throughput.agreement(runs["single"].outputs, runs[name].outputs)

    if "latency" not in args.skip:
        logger.info("serving latency at concurrency %s", args.concurrency)
        result["latency"] = latency.serving_latency(
            ckpt, layout, [p[:64] for p in prompts], args.concurrency, size["requests_per_client"], new_tokens,
            dtype=args.dtype, device=args.device,
        )  # fmt: skip
    if ray.is_initialized():
        ray.shutdown()
    return result


def main(argv: list[str] | None = None, parsed: argparse.Namespace | None = None) -> int:
    args = parsed or build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logger.setLevel(logging.INFO)  # progress, whatever the root level
    started = time.perf_counter()
    result = run(args)
    result["setup"]["bench_seconds"] = time.perf_counter() - started
    text = report.markdown(result)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        args.json.with_suffix(".md").write_text(text)
        for path in report.plots(result, args.json.with_suffix("")):
            logger.info("wrote %s", path)
        logger.info("wrote %s and %s", args.json, args.json.with_suffix(".md"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
