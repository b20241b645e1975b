"""Serving latency under load: the real Serve app over HTTP, streamed completions from an async client.

At each concurrency level C, C clients each send requests back to back (streamed, greedy, a fixed
number of new tokens). Time to first token = request sent -> first chunk with tokens; inter-token
latency = gaps between later chunks divided by the tokens each carried.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import socket
import statistics
import time
from pathlib import Path
from typing import Any

import httpx
import ray
from ray import serve
from ray.serve.config import HTTPOptions

from cluster.backend.placement import Layout
from cluster.serving.app import build_app
from cluster.serving.config import ServeConfig

MODEL = "bench"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(checkpoint: Path, layout: Layout, dtype: str, device: str, max_seqs: int) -> str:
    """Serve one model copy on a free local port; returns its base URL. `stop_server` ends it."""
    port = _free_port()
    cfg = ServeConfig.model_validate({
        "model": {"checkpoint": str(checkpoint), "name": MODEL, "dtype": dtype},
        "cluster": {"attention_shards": layout.attention_shards, "routers": layout.routers,
                    "expert_groups": layout.expert_groups, "device": device},
        "engine": {"max_seqs": max_seqs, "kv_cache_gb": 0.25},
        "serving": {"http_port": port, "grpc_port": _free_port(), "max_ongoing_requests": 1000},
    })  # fmt: skip
    serve.start(http_options=HTTPOptions(host="127.0.0.1", port=port))
    serve.run(build_app(cfg), name="bench", route_prefix="/")
    return f"http://127.0.0.1:{port}"


def stop_server() -> None:
    serve.delete("bench")
    serve.shutdown()  # type: ignore[no-untyped-call]


async def _one(client: httpx.AsyncClient, prompt: list[int], new_tokens: int) -> dict[str, Any]:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "stream": True}
    sent = time.perf_counter()
    arrivals: list[float] = []  # when each chunk with new text came (one token per step)
    async with client.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0]["text"]:
                arrivals.append(time.perf_counter())
    if not arrivals:
        raise RuntimeError("a request produced no tokens")
    done = time.perf_counter()
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    return {"ttft": arrivals[0] - sent, "itl": gaps, "seconds": done - sent}


async def _level(
    url: str, prompts: list[list[int]], concurrency: int, requests: int, new_tokens: int
) -> dict[str, Any]:
    queue: asyncio.Queue[list[int]] = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(prompts[i % len(prompts)])
    results: list[dict[str, Any]] = []

    async def client_loop(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            results.append(await _one(client, queue.get_nowait(), new_tokens))

    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
        wall = time.perf_counter() - start
    ttft = [r["ttft"] for r in results]
    itl = [g for r in results for g in r["itl"]]
    tokens = sum(len(r["itl"]) + 1 for r in results)
    return {
        "concurrency": concurrency,
        "requests": len(results),
        "ttft_ms": {"p50": 1000 * _pct(ttft, 50), "p95": 1000 * _pct(ttft, 95)},
        "itl_ms": {"p50": 1000 * _pct(itl, 50), "p95": 1000 * _pct(itl, 95)},
        "requests_per_s": len(results) / wall,
        "tokens_per_s": tokens / wall,
    }


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def serving_latency(
    checkpoint: Path,
    layout: Layout,
    prompts: list[list[int]],
    levels: list[int],
    requests_per_client: int,
    new_tokens: int,
    dtype: str = "float32",
    device: str = "cpu",
) -> list[dict[str, Any]]:
    """One entry per concurrency level; the server is started once and shut down after."""
    assert ray.is_initialized(), "start Ray first"
    url = start_server(checkpoint, layout, dtype, device, max_seqs=max(levels) * 2)
    try:
        asyncio.run(_level(url, prompts, 1, 2, 4))  # warm-up
        return [asyncio.run(_level(url, prompts, c, c * requests_per_client, new_tokens)) for c in levels]
    finally:
        stop_server()
