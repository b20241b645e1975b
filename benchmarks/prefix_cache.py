"""Time to first token with and without the prefix cache, side by side.

Each round sends a fresh prefix of `prefix_len` tokens (nothing of it cached: the "cold" time),
then the same prefix with another short question after it (its full blocks served from the
cache: the "warm" time). The engine is the single-process one; both requests run alone.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import Any

from benchmarks.workload import mixed_prompts
from cluster.engine.request import SamplingParams
from cluster.llm import LLM

GREEDY_ONE = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)


def first_token_seconds(llm: LLM, prompt: list[int]) -> tuple[float, int]:
    """Seconds from submitting `prompt` to its first token, and the prompt tokens served from the cache."""

    async def run() -> tuple[float, int]:
        start = time.perf_counter()
        async for out in llm.stream(prompt, GREEDY_ONE):
            return time.perf_counter() - start, out.cached_tokens
        raise RuntimeError("the request ended without a token")

    return asyncio.run(run())


def prefix_ttft(llm: LLM, vocab_size: int, prefix_len: int = 2000, rounds: int = 3) -> dict[str, Any]:
    """Median cold and warm time to first token over `rounds` fresh prefixes."""
    cold, warm, cached = [], [], []
    for r in range(rounds):
        prefix = mixed_prompts(1, prefix_len, prefix_len, vocab_size, seed=100 + r)[0]
        first, second = mixed_prompts(2, 16, 16, vocab_size, seed=200 + r)
        seconds, hit = first_token_seconds(llm, prefix + first[1:])
        assert hit == 0, "a fresh prefix was found in the cache"
        cold.append(seconds)
        seconds, hit = first_token_seconds(llm, prefix + second[1:])
        warm.append(seconds)
        cached.append(hit)
    c, w = statistics.median(cold), statistics.median(warm)
    return {"prefix_tokens": prefix_len, "rounds": rounds, "cold_ms": 1000 * c, "warm_ms": 1000 * w,
            "speedup": c / w, "cached_tokens": min(cached)}  # fmt: skip
