"""Structured outputs: throughput of requests that each carry a JSON schema vs the same requests free.

Every request of the constrained run has the same schema (a list of at least `MIN_ITEMS` records
with strings, enums, bounded integers and nested objects), which no answer completes within the
run's tokens: both runs generate exactly `new_tokens` per request, so the ratio is the cost of
the grammar (computing each choice's mask, shipping it, masking the logits before the draw) and
nothing else. Both sample at temperature 1.0, seeded, in the same engine, rounds alternating.
The engine's step records give the masks' share of each step (computed on the engine's thread).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from cluster.engine.request import SamplingParams
from cluster.engine.structured import StructuredOutput
from cluster.llm import LLM

MIN_ITEMS = 40
SCHEMA: dict[str, Any] = {
    "type": "array",
    "minItems": MIN_ITEMS,
    "items": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 12},
            "kind": {"enum": ["book", "film", "song"]},
            "year": {"type": "integer", "minimum": 1900, "maximum": 2030},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
            "score": {"type": "object", "properties": {"stars": {"type": "integer", "minimum": 1, "maximum": 5}},
                      "required": ["stars"], "additionalProperties": False},
        },
        "required": ["name", "kind", "year", "tags", "score"],
        "additionalProperties": False,
    },
}  # fmt: skip


def constrained_vs_free(llm: LLM, prompts: list[list[int]], new_tokens: int, rounds: int = 2) -> dict[str, Any]:
    """Tokens per second of `prompts` run together, free and each under `SCHEMA`, and the masks' time."""
    free = SamplingParams(max_tokens=new_tokens, temperature=1.0, seed=1, ignore_eos=True)
    constrained = free.model_copy(update={"structured": StructuredOutput.json_schema(SCHEMA)})
    llm.generate(prompts[:2], constrained)  # compiles the grammar once, warms the path
    seconds: dict[str, list[float]] = {"free": [], "constrained": []}
    for _ in range(rounds):
        for name, params in (("free", free), ("constrained", constrained)):
            start = time.perf_counter()
            outs = llm.generate(prompts, params)
            seconds[name].append(time.perf_counter() - start)
            assert all(len(o.token_ids) == new_tokens for o in outs), "a request ended early: the figures would differ"
    llm.profile(True)
    llm.generate(prompts, constrained)
    steps = llm.step_profile()["engine"]
    llm.profile(False)
    tokens = len(prompts) * new_tokens
    best = {name: min(s) for name, s in seconds.items()}
    decode = [r for r in steps if r["decode"]]
    return {
        "requests": len(prompts),
        "new_tokens": new_tokens,
        "tok_s": {name: tokens / s for name, s in best.items()},
        "ratio": best["free"] / best["constrained"],  # constrained throughput over free
        "mask_ms_per_step": 1000 * statistics.median(r["masks"] for r in decode),
        "step_ms": 1000 * statistics.median(r["wall"] for r in decode),
        "mask_share": sum(r["masks"] for r in steps) / sum(r["wall"] for r in steps),
    }
