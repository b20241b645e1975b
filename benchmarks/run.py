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
import logging
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks import breakdown, latency, prefix_cache, report, roofline, skewed, structured, throughput
from benchmarks.args import FULL, QUICK, bench_parser
from benchmarks.workload import mixed_prompts
from cluster.backend.placement import Layout
from cluster.llm import LLM
from model.config import ModelConfig, torch_dtype
from protocol.config import Transport, ensure_checkpoint

logger = logging.getLogger("mixtral_cluster.bench")


def run(args: argparse.Namespace) -> dict[str, Any]:
    size = QUICK if args.quick else FULL
    n_prompts = args.prompts or size["prompts"]
    new_tokens = args.new_tokens or size["new_tokens"]
    max_len = args.max_len or size["max_len"]
    torch.set_num_threads(args.threads)
    dtype = torch_dtype(args.dtype)
    ckpt = ensure_checkpoint(
        args.checkpoint or args.cache_dir / f"{args.preset}-seed0",
        None if args.checkpoint else args.preset,
        progress=True,
    )
    config = ModelConfig.from_checkpoint(ckpt)
    layout = Layout(*args.layout)
    prompts = mixed_prompts(n_prompts, args.min_len, max_len, config.vocab_size)
    engine = {"dtype": args.dtype, "device": args.device, "kernels": args.kernels, "kv_cache_gb": 1.0}
    result: dict[str, Any] = {
        "setup": {
            "command": "mixtral-cluster bench " + shlex.join(sys.argv[2:] if sys.argv[1:2] == ["bench"] else []),
            "checkpoint": str(ckpt), "preset": None if args.checkpoint else args.preset,
            "parameters": config.num_parameters, "dtype": args.dtype, "device": args.device, "kernels": args.kernels,
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
    with LLM(ckpt, single_process=True, **engine) as single:
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
        if "structured" not in args.skip:
            logger.info("structured outputs: %d requests each under a JSON schema vs free", n_prompts)
            result["structured"] = structured.constrained_vs_free(single, prompts, new_tokens)
        if "prefix" not in args.skip:
            logger.info("time to first token: a %d-token prefix cached vs not", size["prefix_len"])
            result["prefix_cache"] = prefix_cache.prefix_ttft(single, config.vocab_size, size["prefix_len"])
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
            batch = mixed_prompts(size["roofline_batch"], 16, 16, config.vocab_size, seed=4)
            logger.info("roofline: a decode step of %d sequences against the weights it reads", len(batch))
            bandwidth = throughput.on_own_thread(lambda: roofline.memory_bandwidth(device=args.device))
            result["roofline_batch"] = roofline.batched_decode(single, batch, config, itemsize, bandwidth, 32)

    if "cluster" not in args.skip:
        cluster_parts(args, ckpt, config, layout, engine, prompts, size, result, runs)
    for name, r in runs.items():
        result["throughput_tok_s"][name] = r.tokens_per_s()
        result["throughput_seconds"][name] = r.seconds
    for name in ("hf", "cluster"):
        if name in runs:
            result["agreement"][f"single vs {name}"] = throughput.agreement(runs["single"].outputs, runs[name].outputs)
    return result


def cluster_parts(
    args: argparse.Namespace,
    ckpt: Path,
    config: ModelConfig,
    layout: Layout,
    engine: dict[str, Any],
    prompts: list[list[int]],
    size: dict[str, int],
    result: dict[str, Any],
    runs: dict[str, throughput.Run],
) -> None:
    """Everything that starts workers: the cluster's throughput and step breakdown, the skewed
    load, the data plane against the raw collectives and the serving latency."""
    new_tokens, dtype = args.new_tokens or size["new_tokens"], torch_dtype(args.dtype)
    n_prompts, max_len = len(prompts), args.max_len or size["max_len"]

    import ray

    logger.info("cluster A=%d R=%d G=%d", *args.layout)
    torch.set_num_threads(1)  # this process only drives the engine now; the workers compute
    a, r, g = args.layout
    shape = {"attention_shards": a, "routers": r, "expert_groups": g, "transport": args.transport}
    if args.device == "cuda" and args.transport == "gloo":  # the whole copy on this machine's one GPU
        shape["worker_resources"] = {"GPU": 1.0 / layout.num_workers, "CPU": 1.0}
    with LLM(ckpt, **shape, **engine) as cluster:
        runs["cluster"] = throughput.run_engine(cluster, prompts, new_tokens, size["repeats"])
        logger.info("cluster decode-step breakdown")
        batch = mixed_prompts(size["decode_batch"], 16, 16, config.vocab_size, seed=1)  # one prefill step, then decode
        cluster.generate(batch[:1], throughput.greedy(2))
        cluster.profile(True)
        cluster.generate(batch, throughput.greedy(new_tokens))
        result["breakdown"] = breakdown.decode_breakdown(cluster.step_profile())
        cluster.profile(False)
    transport: Transport = args.transport or ("nccl" if args.device == "cuda" else "gloo")
    gpu_share = 1.0 if transport == "nccl" else 1.0 / layout.num_workers  # gloo: the whole copy may share one GPU
    if "skewed" not in args.skip:
        logger.info("skewed expert load: G=4 with 4 redundant experts, before and after re-placement")
        result["skewed"] = skewed.skewed_load(ckpt, engine, n_prompts, new_tokens, max_len, size["decode_batch"],
                                              size["skewed_rounds"])  # fmt: skip
    raw = breakdown.raw_collectives_ms(
        config, layout, size["decode_batch"], dtype, args.device, transport, gpu_per_peer=gpu_share
    )
    per_layer = result["breakdown"]["data_plane_median"] / config.num_layers  # medians, as the raw figure
    result["collectives"] = {"data_plane_per_layer_ms": per_layer, "raw_per_layer_ms": raw, "ratio": per_layer / raw}

    if "latency" not in args.skip:
        logger.info("serving latency at concurrency %s", args.concurrency)
        result["latency"] = latency.serving_latency(
            ckpt, layout, [p[:64] for p in prompts], args.concurrency, size["requests_per_client"], new_tokens,
            dtype=args.dtype, device=args.device,
        )  # fmt: skip
    if ray.is_initialized():
        ray.shutdown()


def main(argv: list[str] | None = None, parsed: argparse.Namespace | None = None) -> int:
    args = parsed or bench_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logger.setLevel(logging.INFO)  # progress, whatever the root level
    started = time.perf_counter()
    result = run(args)
    result["setup"]["bench_seconds"] = time.perf_counter() - started
    text = report.markdown(result)
    print(text)
    if args.json:
        report.write_json(args.json, result)
        args.json.with_suffix(".md").write_text(text)
        for path in report.plots(result, args.json.with_suffix("")):
            logger.info("wrote %s", path)
        logger.info("wrote %s and %s", args.json, args.json.with_suffix(".md"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
