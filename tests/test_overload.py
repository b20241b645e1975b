"""Overload: 1000 concurrent requests against one tiny model copy with a small queue and KV budget.

Every request must end either answered correctly (greedy text equal to the reference) or refused
at once with a 429 and an error body; afterwards nothing is left running, no KV block is held
and the copy's memory has not run away."""

from __future__ import annotations

import asyncio
import logging
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from ray import serve

from cluster.engine.request import SamplingParams
from cluster.llm import LLM
from tests.support.common import ENGINE_CONFIG
from tests.support.serving import serving

pytestmark = pytest.mark.serve

logger = logging.getLogger(__name__)
MODEL = "mixtral-tiny"
PROMPTS = ["alpha beta", "one two three", "red green blue yellow", "x", "the quick brown fox jumps"]


@pytest.fixture(scope="module")
def ckpt(checkpoint_factory) -> Path:
    return checkpoint_factory(ENGINE_CONFIG, seed=5)


@pytest.fixture(scope="module")
def url(ckpt) -> Iterator[str]:
    # 512 tokens of KV cache, no overcommit: about 40 requests of this size fit at once.
    engine = {"kv_cache_gb": 0.0005, "kv_overcommit": 1.0, "max_model_len": 128}
    with serving(ckpt, engine, serving={"max_ongoing_requests": 64, "max_queued_requests": 100}) as s:
        yield s["url"]


@pytest.fixture(scope="module")
def expected(ckpt) -> dict[str, str]:
    with LLM(ckpt, single_process=True) as llm:
        outs = llm.generate(PROMPTS, SamplingParams(max_tokens=4, temperature=0.0))
    return {p: o.text for p, o in zip(PROMPTS, outs, strict=True)}


def stats() -> dict[str, Any]:
    return serve.get_deployment_handle("LLMServer", app_name="mixtral").stats.remote().result()


async def flood(url: str, n: int) -> list[dict[str, Any]]:
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:

        async def one(i: int) -> dict[str, Any]:
            prompt = PROMPTS[i % len(PROMPTS)]
            start = time.monotonic()
            r = await client.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 4,
                                                           "temperature": 0})  # fmt: skip
            return {"prompt": prompt, "status": r.status_code, "body": r.json(), "headers": r.headers,
                    "seconds": time.monotonic() - start}  # fmt: skip

        return await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(n))), timeout=300)


def test_1000_concurrent_requests_are_answered_or_refused_cleanly(url: str, expected: dict[str, str]) -> None:
    rss_before = stats()["rss_bytes"]
    results = asyncio.run(flood(url, 1000))
    answered = [r for r in results if r["status"] == 200]
    refused = [r for r in results if r["status"] == 429]
    assert len(answered) + len(refused) == 1000, {r["status"] for r in results}
    assert answered and refused  # the limits were reached, and work still got done
    for r in answered:
        assert r["body"]["choices"][0]["text"] == expected[r["prompt"]]
    for r in refused:
        assert r["body"]["error"]["type"] == "rate_limit_error" and r["body"]["error"]["code"] == "overloaded"
        assert int(r["headers"]["retry-after"]) > 0
    after = stats()
    assert (after["running"], after["waiting"], after["blocks_in_use"], after["admitted_tokens"]) == (0, 0, 0, 0)
    assert after["rss_bytes"] - rss_before < 256 << 20  # memory stayed bounded
    logger.info(
        "1000 concurrent: %d answered (p50 %.2f s), %d refused with 429 (p50 %.2f s); replica RSS %+.0f MB",
        len(answered), statistics.median(r["seconds"] for r in answered), len(refused),
        statistics.median(r["seconds"] for r in refused), (after["rss_bytes"] - rss_before) / 2**20,
    )  # fmt: skip
    # And the copy still serves normally.
    r = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 4,
                                                  "temperature": 0}, timeout=30)  # fmt: skip
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == expected[PROMPTS[0]]
