"""`mixtral-cluster soak`: a bounded soak of the real Serve app with mixed traffic.

    mixtral-cluster soak --minutes 10 --json soak.json

Waves of concurrent requests (streamed, non-streamed, and streams the client abandons midway)
run against one model copy until the time is up. After each wave, once the copy is idle, it
records KV blocks in use, the replica's and every worker's resident memory, the alive actors,
and whether fixed greedy probes still equal the single-process reference. It fails (exit 1) if
blocks stay held, memory or actors grow, or an answer changes.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import ray
from ray import serve
from ray._private import state as ray_state

from benchmarks.args import soak_parser
from benchmarks.latency import MODEL, start_server, stop_server
from benchmarks.report import write_json
from cluster.backend.placement import Layout
from cluster.engine.request import SamplingParams
from cluster.llm import LLM
from protocol.config import ensure_checkpoint

logger = logging.getLogger("mixtral_cluster.soak")
PROBES = ["The capital of France is", "1, 2, 3, 4,", "Once upon a time"]
MEMORY_GROWTH_LIMIT = 64 << 20  # bytes per process, last wave vs the first


async def _wave(url: str, n: int, rng: random.Random) -> dict[str, int]:
    counts = {"plain": 0, "stream": 0, "abandoned": 0, "errors": 0}

    async def one(client: httpx.AsyncClient) -> None:
        kind = rng.choice(["plain", "stream", "abandoned"])
        body = {"model": MODEL, "prompt": rng.choice(PROBES) + " " + "word " * rng.randint(0, 60),
                "max_tokens": rng.randint(4, 48), "temperature": rng.choice([0.0, 0.8]),
                "stream": kind != "plain"}  # fmt: skip
        try:
            if kind == "plain":
                r = await client.post("/v1/completions", json=body)
                ok = r.status_code == 200
            else:
                async with client.stream("POST", "/v1/completions", json=body) as r:
                    ok = r.status_code == 200
                    seen = 0
                    async for line in r.aiter_lines():
                        seen += line.startswith("data: ")
                        if kind == "abandoned" and seen >= 2:
                            break  # the client leaves; the request must be aborted
            counts[kind] += 1
            counts["errors"] += not ok
        except httpx.HTTPError:
            counts["errors"] += 1

    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        await asyncio.gather(*(one(client) for _ in range(n)))
    return counts


def _idle_stats(timeout_s: float = 60) -> dict[str, Any]:
    """The copy's stats once nothing is running (abandoned streams are aborted at the next step)."""
    handle = serve.get_deployment_handle("LLMServer", app_name="bench")
    deadline = time.monotonic() + timeout_s
    while True:
        s: dict[str, Any] = handle.stats.remote().result()
        if (s["running"], s["waiting"]) == (0, 0) or time.monotonic() > deadline:
            s["workers"] = {w["name"]: w["rss_bytes"] for w in handle.workers.remote().result()}
            return s
        time.sleep(0.2)


def _probe(url: str) -> list[str]:
    out = []
    for p in PROBES:
        r = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": p, "max_tokens": 12, "temperature": 0},
                       timeout=60)  # fmt: skip
        out.append(r.json()["choices"][0]["text"] if r.status_code == 200 else f"HTTP {r.status_code}")
    return out


def soak(checkpoint: Path, layout: Layout, seconds: float, concurrency: int, seed: int = 0) -> dict[str, Any]:
    """Run waves until `seconds` pass; returns the records and the verdict."""
    with LLM(checkpoint, single_process=True) as ref:
        expected = [o.text for o in ref.generate(PROBES, SamplingParams(max_tokens=12, temperature=0.0))]
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=32, include_dashboard=False, logging_level=logging.WARNING)
    url = start_server(checkpoint, layout, "float32", "cpu", max_seqs=64)
    rng = random.Random(seed)
    waves: list[dict[str, Any]] = []
    try:
        start = time.monotonic()
        while time.monotonic() - start < seconds or not waves:
            counts = asyncio.run(_wave(url, concurrency, rng))
            s = _idle_stats()
            actors = sum(a["State"] == "ALIVE" for a in ray_state.actors().values())
            waves.append({"t": time.monotonic() - start, **counts, "blocks_in_use": s["blocks_in_use"],
                          "replica_rss": s["rss_bytes"], "worker_rss": s["workers"], "actors": actors,
                          "probes_equal": _probe(url) == expected})  # fmt: skip
            shown = ("plain", "stream", "abandoned", "errors", "blocks_in_use", "actors", "probes_equal")
            logger.info("wave %d at %.0f s: %s", len(waves), waves[-1]["t"], {k: waves[-1][k] for k in shown})
    finally:
        stop_server()
    first, last = waves[0], waves[-1]
    growth = {"replica": last["replica_rss"] - first["replica_rss"]}
    growth |= {name: last["worker_rss"][name] - rss for name, rss in first["worker_rss"].items()}
    problems = []
    if any(w["blocks_in_use"] for w in waves):
        problems.append("KV blocks stayed in use after a wave")
    if any(w["actors"] != first["actors"] for w in waves):
        problems.append("the number of alive actors changed")
    if not all(w["probes_equal"] for w in waves):
        problems.append("a greedy probe stopped matching the reference")
    if any(w["errors"] for w in waves):
        problems.append("some requests failed")
    problems += [f"{name} grew by {g / 2**20:.0f} MB" for name, g in growth.items() if g > MEMORY_GROWTH_LIMIT]
    requests = sum(w["plain"] + w["stream"] + w["abandoned"] for w in waves)
    return {"seconds": last["t"], "waves": waves, "requests": requests, "memory_growth_bytes": growth,
            "problems": problems}  # fmt: skip


def main(argv: list[str] | None = None, parsed: argparse.Namespace | None = None) -> int:
    args = parsed or soak_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logger.setLevel(logging.INFO)
    ckpt = ensure_checkpoint(
        args.checkpoint or args.cache_dir / "tiny-seed0", None if args.checkpoint else "tiny", progress=True
    )
    result = soak(ckpt, Layout(*args.layout), args.minutes * 60, args.concurrency)
    if ray.is_initialized():
        ray.shutdown()
    write_json(args.json, result)
    growth = ", ".join(f"{k} {v / 2**20:+.1f} MB" for k, v in result["memory_growth_bytes"].items())
    logger.info("%d requests in %d waves over %.0f s; memory: %s", result["requests"], len(result["waves"]),
                result["seconds"], growth)  # fmt: skip
    for p in result["problems"]:
        logger.error("soak failed: %s", p)
    return 1 if result["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
