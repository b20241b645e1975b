"""Redundant experts and live re-placement on a real local Ray cluster.

A checkpoint whose gates send most tokens of every layer to experts 6 and 7 (which the initial
placement puts in one group) runs on G=4 groups over 8 experts with 4 redundant slots. Before
re-placement one group does most of the work (imbalance >= 2); `rebalance()` gives the hot experts
replicas in other groups while requests stream, and switches between two steps; after it each
phase's step is faster and nearly even in what it costs (`evened`), and the pairs far more even
than before. Greedy outputs equal transformers' before, during and after."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import pytest
import ray
import torch
from transformers import MixtralForCausalLM

from actors.expert_group import moves_to
from benchmarks.skewed import held_placement
from benchmarks.workload import skewed_copy
from cluster.engine.backend import RebalanceUnavailable
from cluster.engine.expert_planner import plan_placement
from cluster.engine.request import SamplingParams
from cluster.llm import LLM
from model import ModelConfig
from tests.support.common import local_ray, random_prompts

pytestmark = pytest.mark.ray

GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
PROMPTS = random_prompts(12, seed=3, low=5, high=30)
COPY = {"attention_shards": 1, "routers": 1, "expert_groups": 4, "redundant_experts": 4, "block_size": 4,
        "num_blocks": 512}  # fmt: skip


def evened(phases: dict[str, dict[str, float]]) -> bool:
    """Whether the planner's placement makes each phase's step faster and takes away most of its
    imbalance: at most 30% of the cost over even is left. Not a fixed ceiling: at decode sizes a
    hot expert's weights are read whole by each holder, so how near 1 a step can get depends on
    the rates the copy measured at start-up (measured here: decode 1.55-1.67 -> 1.07-1.11, prefill
    1.43-1.71 -> 1.00-1.01 over three starts)."""
    return all(
        f["expert_ms_after"] < f["expert_ms_before"]
        and f["cost_imbalance_after"] - 1 <= 0.3 * (f["cost_imbalance_before"] - 1)
        for f in phases.values()
    )


def improved(phases: dict[str, dict[str, float]]) -> bool:
    """Whether the placement is predicted to make no phase's step slower and some step faster: the
    planner's own rule for taking one (`cluster.backend.placement`), and all a re-placement on an
    interval can promise. It plans from whatever steps ran since the last one, here a few decode
    steps whose cost was already near even, so how much it takes away is not fixed (CI runs:
    9.61 -> 9.58 ms with the imbalance 1.086 -> 1.120, as a replica's extra weight reads count
    against it; 1.061 -> 1.034). `evened` holds a whole workload to more."""
    return all(f["expert_ms_after"] <= f["expert_ms_before"] for f in phases.values()) and any(
        f["expert_ms_after"] < f["expert_ms_before"] for f in phases.values()
    )


@pytest.fixture(scope="module", autouse=True)
def shared_ray() -> None:
    local_ray()


@pytest.fixture(scope="module")
def skewed(checkpoint_factory: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return skewed_copy(checkpoint_factory(ModelConfig.preset("tiny"), seed=5), tmp_path_factory.mktemp("skewed"))


@pytest.fixture(scope="module")
def reference(skewed: Path) -> list[list[int]]:
    hf = MixtralForCausalLM.from_pretrained(skewed, dtype=torch.float32).eval()
    outs = []
    for p in PROMPTS:
        ids = hf.generate(torch.tensor([p]), max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=0)
        outs.append(ids[0, len(p) :].tolist())
    return outs


def test_replicas_balance_a_skewed_load_while_requests_run(skewed: Path, reference: list[list[int]]) -> None:
    with LLM(skewed, **COPY) as llm:
        slots = {n: s["slots"] for n, s in llm.backend.reports("settings").items() if n.startswith("experts")}
        assert [len(layer0) for layer0 in (s[0] for s in slots.values())] == [3, 3, 3, 3]
        assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY)] == reference  # before
        before = llm.stats()
        assert before["imbalance"] >= 2, before  # experts 6 and 7 share a group: it does most of the work

        during: list[list[int]] = []

        def stream_meanwhile() -> None:  # requests decoding while the weights move and the switch happens
            async def run() -> list[list[int]]:
                async def one(p: list[int]) -> list[int]:
                    return [o async for o in llm.stream(p, GREEDY.model_copy(update={"max_tokens": 10}))][-1].token_ids

                return list(await asyncio.gather(*(one(p) for p in PROMPTS)))

            during.extend(asyncio.run(run()))

        streams = threading.Thread(target=stream_meanwhile)
        streams.start()
        report = llm.rebalance()
        streams.join(timeout=120)
        assert during == reference  # during
        assert report["imbalance_before"] >= 2 and report["moved"] > 0
        # Faster and nearly even in what a step costs (the planner's aim), and far more even in
        # pairs, though not to 1: at decode sizes a second read of a hot expert's weights costs
        # more than its rows.
        assert evened(report["phases"]), report["phases"]
        assert report["imbalance_after"] <= 0.6 * report["imbalance_before"], report
        placed = report["placement"]
        assert all(sum(6 in g for g in layer) >= 2 and sum(7 in g for g in layer) >= 2 for layer in placed)
        assert held_placement(llm) == placed  # the groups hold what the report says

        assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY)] == reference  # after
        after = llm.stats()
        # Even, not to the planner's figure: these steps are not the recorded ones (the prefix cache
        # serves the prompts now, and the streams' last steps ran after the switch), and the split
        # follows the cost model measured at start-up. Prediction met exactly: the last test below.
        assert after["imbalance"] <= before["imbalance"] * 0.6, (after, before, report["imbalance_after"])
        assert all(after["cost_imbalance"][p] < before["cost_imbalance"][p] for p in after["cost_imbalance"])
        assert sum(after["tokens_per_group"]) > 0 and min(after["tokens_per_group"]) > 0


def test_rebalancing_on_an_interval_and_only_where_there_are_groups(skewed: Path, reference: list[list[int]]) -> None:
    with LLM(skewed, **COPY, rebalance_interval_s=0.5) as llm:
        llm.generate(PROMPTS, GREEDY)
        deadline = 30.0
        while llm.engine.experts.rebalances == 0 and deadline > 0:  # idle: the loop still tends to it
            threading.Event().wait(0.1)
            deadline -= 0.1
        assert llm.engine.experts.rebalances >= 1 and llm.engine.experts.last_rebalance is not None
        last = llm.engine.experts.last_rebalance
        assert last["moved"] > 0 and improved(last["phases"]), last
        assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY)] == reference
    with LLM(skewed, single_process=True) as single, pytest.raises(RebalanceUnavailable, match="one process"):
        single.rebalance()


def test_the_same_prompts_after_replacement_measure_what_the_planner_predicted(skewed: Path) -> None:
    """The planner replays the recorded steps under the new placement with the routers' own split
    (`split_pairs` by the copy's measured cost model), so running the same prompts again (no prefix
    cache: the same steps) measures the pair imbalance it predicted, and each phase's modelled
    expert time is what it said."""
    with LLM(skewed, **COPY, prefix_caching=False) as llm:
        cost = next(s["cost"] for n, s in llm.backend.reports("settings").items() if n.startswith("router"))
        assert cost["source"].startswith("measured") and cost["row_s"] > 0 and cost["weight_s"] >= 0
        llm.generate(PROMPTS, GREEDY)
        before = llm.stats()
        report = llm.rebalance()
        assert "refused" not in report, report
        assert report["imbalance_before"] == pytest.approx(before["imbalance"])
        llm.generate(PROMPTS, GREEDY)
        after = llm.stats()
        assert abs(after["imbalance"] - report["imbalance_after"]) <= 0.05, (after, report)
        for phase, figures in report["phases"].items():
            assert after["expert_ms_per_step"][phase] == pytest.approx(figures["expert_ms_after"], rel=0.05)
            assert figures["expert_ms_after"] < figures["expert_ms_before"]
            assert after["cost_imbalance"][phase] < before["cost_imbalance"][phase]


def test_each_switch_takes_the_weights_read_for_it(skewed: Path, reference: list[list[int]]) -> None:
    """The groups read a re-placement's weights beside their steps, so the next one's may be read
    while this one's switch is still queued, or running (copying 8x7B's weights takes a while). Each
    switch must take the weights read for it, not the latest read: here both re-placements are read
    before either switches, then they switch in order, the routers with them; the groups hold each
    placement in turn and the outputs equal transformers' at each."""
    with LLM(skewed, **COPY) as llm:
        backend = llm.backend
        initial = backend.placement
        groups = [
            (s.index, a)
            for s, a in zip(backend.workers.specs, backend.workers.actors, strict=True)
            if s.role == "experts"
        ]
        routers = [a for s, a in zip(backend.workers.specs, backend.workers.actors, strict=True) if s.role == "router"]
        moved = tuple(tuple(layer[1:] + layer[:1]) for layer in initial)  # each group takes the next one's experts
        ray.get([a.stage.remote(moves_to([list(layer[g]) for layer in initial], moved, g), 1) for g, a in groups])
        ray.get([a.stage.remote(moves_to([list(layer[g]) for layer in moved], initial, g), 2) for g, a in groups])
        for placement, number in ((moved, 1), (initial, 2)):
            ray.get(
                [a.commit.remote(number) for _, a in groups] + [r.commit_placement.remote(placement) for r in routers]
            )
            assert held_placement(llm) == [[list(g) for g in layer] for layer in placement]
            assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY)] == reference


def test_a_replacement_during_which_a_group_was_replaced_is_abandoned(skewed: Path, reference: list[list[int]]) -> None:
    """A group replaced while a re-placement's weights are read starts with the placement the copy
    has, without the new weights: switching the others would route rows to experts it lacks. The
    re-placement is abandoned instead (the report says why) and the copy serves as it was."""
    with LLM(skewed, **COPY) as llm:
        backend = llm.backend
        initial = backend.placement
        llm.generate(PROMPTS, GREEDY)
        skew = (torch.ones(4, 8, dtype=torch.long) * torch.arange(8)).tolist()
        new, plan = plan_placement([("all", skew)], initial, backend.slots, backend.cost)
        assert "refused" not in plan and backend.stage_placement(new) > 0
        ray.kill(backend.workers.actors[[s.name for s in backend.workers.specs].index("experts-1")])
        assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY)] == reference  # replaced, the step run again
        done, why = backend.switch_placement()
        assert done and why is not None, "the switch went ahead with a group that lacks the new weights"
        assert backend.placement == initial
        assert held_placement(llm) == [[list(g) for g in layer] for layer in initial]
        assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY)] == reference


def test_a_placement_given_is_taken_and_a_malformed_one_refused(skewed: Path, reference: list[list[int]]) -> None:
    """`rebalance(placement=...)`: the model's placement, then the initial one again at once (what the
    skewed bench does to compare the two step by step); one that does not fit the slots is refused."""
    with LLM(skewed, **COPY) as llm:
        initial = llm.backend.placement
        llm.generate(PROMPTS, GREEDY)
        assert llm.rebalance()["moved"] > 0
        back = llm.rebalance(placement=initial)
        assert back["requested"] and back["moved"] > 0 and back["predicted"]["pair_imbalance"] > 0
        assert held_placement(llm) == [[list(g) for g in layer] for layer in initial]
        assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY)] == reference
        with pytest.raises(ValueError, match="layer 0: no group holds experts \\[7\\]"):
            llm.rebalance(placement=[[[0, 1, 2], [3, 4, 5], [6, 0, 1], [2, 3, 4]]] * 4)
        with pytest.raises(ValueError, match="slots"):
            llm.rebalance(placement=[[[0, 1], [2, 3], [4, 5], [6, 7]]] * 4)
