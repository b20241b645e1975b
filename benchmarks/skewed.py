"""Skewed expert load: the cluster on a checkpoint whose gates send most tokens to two experts,
before and after re-placement, side by side.

The skewed copy of the benchmark checkpoint (`workload.skewed_copy`: experts 6 and 7 take most
tokens of every layer, and the initial placement puts them in one group) runs on G=4 expert
groups over 8 experts with 4 redundant slots. The same workload runs twice on one copy: with the
initial placement, then after `rebalance()` has given the hot experts replicas. Each run reports
throughput, the imbalance (heaviest group's pairs over the mean, per layer), the cost model's
imbalance per phase, and the breakdowns of a decode step and of a 512-token prefill step.
"""

from __future__ import annotations

import itertools
import logging
import statistics
from pathlib import Path
from typing import Any

from benchmarks import breakdown, throughput
from benchmarks.workload import mixed_prompts, skewed_copy
from cluster.llm import LLM

logger = logging.getLogger(__name__)

PHASES = ("before", "after")  # re-placement: the initial placement, then the model's
PREFILL_TOKENS = 512  # the prefill step measured: one prompt this long, in one step
LAYOUT: dict[str, Any] = {"attention_shards": 1, "routers": 1, "expert_groups": 4, "redundant_experts": 4}


def skewed_load(
    checkpoint: Path,
    engine: dict[str, Any],
    prompts: int,
    new_tokens: int,
    max_len: int,
    decode_batch: int,
    rounds: int = 3,
) -> dict[str, Any]:
    """Throughput, imbalance and step breakdown on the skewed checkpoint, before and after
    re-placement; then `rounds` rounds of the two placements in turn on the same copy (each switched
    to with `rebalance(placement=...)`), a decode and a prefill step of each per round: the steps'
    comparison paired, so that the machine's drift over the run does not decide it."""  # fmt: skip
    skewed = checkpoint.parent / f"{checkpoint.name}-skewed"
    if not (skewed / "config.json").is_file():
        skewed_copy(checkpoint, skewed)
    engine = engine | {"max_batched_tokens": max(engine.get("max_batched_tokens", 0), PREFILL_TOKENS)}
    with LLM(skewed, **LAYOUT, **engine) as llm:
        vocab = llm.model_config.vocab_size
        initial = held_placement(llm)
        workload = mixed_prompts(prompts, 8, max_len, vocab, seed=2)
        batch = mixed_prompts(decode_batch, 16, 16, vocab, seed=3)
        out: dict[str, Any] = {}
        for phase in PHASES:
            if phase == "after":
                out["rebalance"] = {k: v for k, v in llm.rebalance().items() if k != "placement"}
            run = throughput.run_engine(llm, workload, new_tokens, repeats=1)
            load = llm.stats()
            llm.profile(True)
            llm.generate(batch, throughput.greedy(new_tokens))
            steps = breakdown.decode_breakdown(llm.step_profile())
            llm.profile(True)  # afresh: one prompt of PREFILL_TOKENS in one step
            prompt = mixed_prompts(1, PREFILL_TOKENS, PREFILL_TOKENS, vocab, seed=4 if phase == "before" else 5)
            llm.generate(prompt, throughput.greedy(1))  # a new prompt each time: nothing of it cached
            prefill = breakdown.decode_breakdown(llm.step_profile(), decode=False)
            llm.profile(False)
            out[phase] = {"tokens_per_s": run.tokens_per_s(), "imbalance": load["imbalance"],
                          "cost_imbalance": load["cost_imbalance"], "tokens_per_group": load["tokens_per_group"],
                          "breakdown": steps, "prefill_breakdown": prefill}  # fmt: skip
            logger.info("skewed load %s re-placement: %.1f tok/s, imbalance %.2f", phase, run.tokens_per_s(),
                        load["imbalance"])  # fmt: skip
        chosen = held_placement(llm)
        paired: dict[str, dict[str, list[float]]] = {p: {"decode_ms": [], "prefill_ms": []} for p in PHASES}
        seeds = itertools.count(100)
        for _ in range(rounds):
            for phase, placement in (("before", initial), ("after", chosen)):
                llm.rebalance(placement=placement)
                llm.profile(True)
                llm.generate(batch, throughput.greedy(new_tokens))
                paired[phase]["decode_ms"].append(breakdown.decode_breakdown(llm.step_profile())["step"])
                llm.profile(True)
                llm.generate(mixed_prompts(1, PREFILL_TOKENS, PREFILL_TOKENS, vocab, seed=next(seeds)),
                             throughput.greedy(1))  # fmt: skip
                prefill_ms = breakdown.decode_breakdown(llm.step_profile(), decode=False)["step"]
                paired[phase]["prefill_ms"].append(prefill_ms)
                llm.profile(False)
        out["paired"] = {"rounds": rounds} | {
            phase: dict(figures) | {f"{k}_median": statistics.median(v) for k, v in figures.items()}
            for phase, figures in paired.items()
        }
        return out


def held_placement(llm: LLM) -> list[list[list[int]]]:
    """[layer][group] -> experts, as the copy's expert groups report holding them."""
    held = {n: s["slots"] for n, s in llm.backend.reports("settings").items() if n.startswith("experts")}
    groups = [held[f"experts-{g}"] for g in range(len(held))]
    return [[g[layer] for g in groups] for layer in range(len(groups[0]))]
