"""What a step's messages cost, side by side: every worker sent every shard's batch with whole
block tables (the whole plan, as before) against each worker sent its own part
(`protocol.step.step_messages`) with only the block-table entries that changed (`new_blocks`).

    python -m benchmarks.step_messages                      # 8x7B shapes, A=4 R=2 G=8
    python -m benchmarks.step_messages --layout 2 1 4 --context 32768 --json out.json

The batches are those of a busy decode step (`--seqs` sequences of `--context` tokens, one token
each; in steady state a sequence gets a new block once every `--block-size` steps) and of a
prefill step (`--prefill` prompt tokens in one chunk, its whole table new), dealt over the
attention shards. "per role" sends each worker its part with whole tables, "per role + delta"
also sends only what changed: the two savings apart. For each: the bytes a worker receives (pickled as Ray
pickles arguments), summed over the copy's workers and at the worker that gets the most, and
the milliseconds of pickling: in all (CPU), and on the step's path (the engine pickling, the
slowest worker unpickling), on this CPU.
"""

from __future__ import annotations

import argparse
import logging
import pickle
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.report import write_json
from cluster.backend.placement import Layout, worker_specs
from model.config import ModelConfig
from model.sampling import DrawParams
from protocol.step import SeqChunk, ShardBatch, step_messages
from protocol.worker import WorkerSpec

logger = logging.getLogger("mixtral_cluster.step_messages")

REPEATS = 20  # timings: the best of this many


def decode_batches(shards: int, seqs: int, context: int, block_size: int, delta: bool) -> list[ShardBatch]:
    """One decode token of each of `seqs` sequences at `context` tokens, dealt over the shards;
    `delta`: each chunk carries only its table's new entries (one sequence in `block_size` starts a
    block this step) and no draw settings (its shard keeps them), else its whole table and its settings."""
    batches = [ShardBatch() for _ in range(shards)]
    blocks = -(-context // block_size)
    for s in range(seqs):
        params = DrawParams(temperature=0.7, top_p=0.9, seed=s)  # each request its own, as the engine's
        table = list(range(s * blocks, (s + 1) * blocks))
        start = (blocks - 1 if s % block_size == 0 else blocks) if delta else 0
        chunk = SeqChunk(f"req-{s}", [1000 + s], context - 1, table[start:], True, None if delta else params,
                         blocks_from=start)  # fmt: skip
        batches[s % shards].chunks.append(chunk)
    return batches


def prefill_batches(shards: int, tokens: int, block_size: int) -> list[ShardBatch]:
    """One prompt of `tokens` tokens in one chunk, on shard 0 (its whole table is new)."""
    batches = [ShardBatch() for _ in range(shards)]
    table = list(range(-(-tokens // block_size)))
    batches[0].chunks.append(SeqChunk("prompt", list(range(tokens)), 0, table, True, DrawParams()))
    return batches


def _best_ms(fn: Any) -> float:
    best = float("inf")
    for _ in range(REPEATS):
        began = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - began)
    return 1e3 * best


def _cost(messages: list[Any]) -> dict[str, float]:
    """Bytes of pickled `messages` (one per worker) and pickling ms: in all (`cpu_ms`), and on the
    step's path (`path_ms`: the engine pickling them all, the slowest worker unpickling its own)."""
    blobs = [pickle.dumps(m, protocol=5) for m in messages]
    put_ms = _best_ms(lambda: [pickle.dumps(m, protocol=5) for m in messages])
    reads = [_best_ms(lambda b=b: pickle.loads(b)) for b in blobs]
    return {"bytes_total": sum(map(len, blobs)), "bytes_max_worker": max(map(len, blobs)),
            "cpu_ms": put_ms + sum(reads), "path_ms": put_ms + max(reads)}  # fmt: skip


def _whole_plan_cost(batches: list[ShardBatch], workers: int) -> dict[str, float]:
    """As before: one object, every shard's batch, pickled once and unpickled by every worker."""
    blob = pickle.dumps(batches, protocol=5)
    put_ms, read_ms = _best_ms(lambda: pickle.dumps(batches, protocol=5)), _best_ms(lambda: pickle.loads(blob))
    return {"bytes_total": workers * len(blob), "bytes_max_worker": len(blob),
            "cpu_ms": put_ms + workers * read_ms, "path_ms": put_ms + read_ms}  # fmt: skip


def measure(whole: list[ShardBatch], delta: list[ShardBatch], specs: list[WorkerSpec]) -> dict[str, Any]:
    """The step's messages three ways: `whole` (batches with whole tables) to every worker, to each
    its part, and `delta` (batches with what changed) to each its part."""
    parts = step_messages(delta, specs)
    return {
        "whole_plan": _whole_plan_cost(whole, len(specs)),
        "per_role": _cost(step_messages(whole, specs)),
        "per_role_delta": _cost(parts),
        "by_role": {
            role: max((len(pickle.dumps(m, protocol=5)) for m, s in zip(parts, specs, strict=True) if s.role == role))
            for role in ("attention", "router", "experts")
        },
    }


def run(layout: Layout, config: ModelConfig, seqs: int, context: int, prefill: int, block_size: int) -> dict[str, Any]:
    specs = worker_specs(layout, config.num_experts)
    shards = layout.attention_shards
    return {
        "layout": [layout.attention_shards, layout.routers, layout.expert_groups],
        "workers": len(specs),
        "decode": measure(
            decode_batches(shards, seqs, context, block_size, delta=False),
            decode_batches(shards, seqs, context, block_size, delta=True),
            specs,
        )
        | {"seqs": seqs, "context": context},
        "prefill": measure(
            prefill_batches(shards, prefill, block_size), prefill_batches(shards, prefill, block_size), specs
        )
        | {"tokens": prefill},
    }


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.step_messages", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="mixtral-8x7b", help="model shape (configs/models/); default mixtral-8x7b")
    p.add_argument("--layout", type=int, nargs=3, default=[4, 2, 8], metavar=("A", "R", "G"),
                   help="attention shards, routers, expert groups; default 4 2 8")  # fmt: skip
    p.add_argument("--seqs", type=int, default=128, help="decoding sequences in the step; default 128")
    p.add_argument("--context", type=int, default=4096, help="tokens of each decoding sequence; default 4096")
    p.add_argument("--prefill", type=int, default=4096, help="prompt tokens of the prefill step; default 4096")
    p.add_argument("--block-size", type=int, default=16, help="KV block size; default 16")
    p.add_argument("--json", type=Path, help="also write the figures here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    config = ModelConfig.preset(args.preset)
    result = run(Layout(*args.layout), config, args.seqs, args.context, args.prefill, args.block_size)
    for step in ("decode", "prefill"):
        r = result[step]
        ways = ", ".join(
            f"{way}: {f['bytes_max_worker'] / 1e3:.1f} kB at most, {f['bytes_total'] / 1e3:.1f} kB in all, "
            f"{f['cpu_ms']:.2f} ms CPU, {f['path_ms']:.2f} ms on the path"
            for way, f in ((w, r[w]) for w in ("whole_plan", "per_role", "per_role_delta"))
        )
        fewer = r["whole_plan"]["bytes_total"] / r["per_role_delta"]["bytes_total"]
        roles = ", ".join(f"{k} {v / 1e3:.2f} kB" for k, v in r["by_role"].items())
        logger.info("%s step, %d workers | %s | %.0fx fewer bytes (largest message by role: %s)",
                    step, result["workers"], ways, fewer, roles)  # fmt: skip
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
