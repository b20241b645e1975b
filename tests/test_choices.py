"""Several choices of one prompt (`n`) and prompt scoring (`prompt_logprobs`, `max_tokens` 0).

The choices of an `n` > 1 request share the prompt's KV blocks: the prompt is computed once and
each choice forks from it, with its own copy of a partly filled last block. Choice i draws with
the seed + i, so it equals a single request with that seed, token for token. Prompt logprobs
equal transformers' log-softmax of the same checkpoint."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import MixtralForCausalLM

from cluster.engine.request import RequestError, SamplingParams
from cluster.llm import LLM
from tests.support.common import ENGINE_CONFIG, idle, random_prompts

pytestmark = pytest.mark.unit

SAMPLED = SamplingParams(max_tokens=6, temperature=1.0, top_p=0.95, seed=40, ignore_eos=True)


@pytest.fixture(scope="module")
def ckpt(checkpoint_factory: Any) -> Path:
    return checkpoint_factory(ENGINE_CONFIG, seed=5)


@pytest.fixture(scope="module")
def llm(ckpt: Path) -> Any:
    with LLM(ckpt, single_process=True, block_size=4, num_blocks=256, max_batched_tokens=24) as engine:
        yield engine


@pytest.mark.parametrize("prompt_len", [20, 18], ids=["whole-blocks", "partial-last-block"])
def test_choice_i_equals_a_single_request_seeded_seed_plus_i(llm: LLM, prompt_len: int) -> None:
    prompt = random_prompts(1, seed=prompt_len, low=prompt_len, high=prompt_len)[0]
    choices = llm.generate([prompt], SAMPLED.model_copy(update={"n": 3}))
    assert [o.index for o in choices] == [0, 1, 2] and len({tuple(o.token_ids) for o in choices}) > 1
    for o in choices:
        single = llm.generate([prompt], SAMPLED.model_copy(update={"seed": 40 + o.index}))[0]
        assert o.token_ids == single.token_ids and o.text == single.text
    again = llm.generate([prompt], SAMPLED.model_copy(update={"n": 3}))
    assert [o.token_ids for o in again] == [o.token_ids for o in choices]  # reproducible
    assert llm.stats()["blocks_in_use"] == 0


def test_the_prompt_is_computed_once_for_all_choices(llm: LLM) -> None:
    prompt = random_prompts(1, seed=6, low=20, high=20)[0]
    params = SAMPLED.model_copy(update={"n": 4, "max_tokens": 5})
    llm.profile(True)
    outs = llm.generate([prompt], params)
    records = llm.step_profile()["engine"]
    llm.profile(False)
    assert len(outs) == 4 and all(len(o.token_ids) == 5 for o in outs)
    assert sum(r["tokens"] for r in records) == len(prompt) + 4 * (5 - 1)  # not 4 prefills


def test_a_choice_with_no_block_for_its_copy_waits_and_still_equals_its_single_request(ckpt: Path) -> None:
    prompt = random_prompts(1, seed=9, low=10, high=10)[0]  # 3 blocks of 4, the last one partly filled
    params = SAMPLED.model_copy(update={"n": 3, "max_tokens": 3})
    with LLM(ckpt, single_process=True, block_size=4, num_blocks=4) as small:  # room for one copy only
        outs = small.generate([prompt], params)
        assert small.stats()["blocks_in_use"] == 0
    with LLM(ckpt, single_process=True, block_size=4, num_blocks=64) as roomy:
        for o in outs:
            assert (
                o.token_ids
                == roomy.generate([prompt], params.model_copy(update={"n": 1, "seed": 40 + o.index}))[0].token_ids
            )


def test_greedy_choices_agree_and_an_aborted_request_frees_every_choice(llm: LLM) -> None:
    prompt = random_prompts(1, seed=2, low=13, high=13)[0]
    greedy = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    outs = llm.generate([prompt], greedy.model_copy(update={"n": 3}))
    assert [o.token_ids for o in outs] == [llm.generate([prompt], greedy)[0].token_ids] * 3

    async def abort_midway() -> set[int]:
        seen: set[int] = set()
        stream = llm.stream(prompt, greedy.model_copy(update={"n": 3, "max_tokens": 500}))
        async for out in stream:
            seen.add(out.index)
            if len(out.token_ids) >= 3:
                break
        await stream.aclose()
        return seen

    assert asyncio.run(abort_midway()) == {0, 1, 2}
    assert idle(llm.stats()) == {"running": 0, "waiting": 0, "blocks_in_use": 0}


def test_n_and_scoring_settings_are_checked(llm: LLM) -> None:
    prompt = [1, 2, 3]
    for params, param in [
        (SamplingParams(n=17), "n"),
        (SamplingParams(max_tokens=0), "max_tokens"),  # nothing to do: scoring needs prompt_logprobs
        (SamplingParams(max_tokens=0, prompt_logprobs=1, n=2), "max_tokens"),
    ]:
        with pytest.raises(RequestError) as e:
            llm.generate([prompt], params)
        assert e.value.param == param


# ---- prompt scoring ---------------------------------------------------------------------------


def reference_logprobs(ckpt: Path, tokens: list[int]) -> torch.Tensor:
    hf = MixtralForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    with torch.no_grad():
        return torch.log_softmax(hf(torch.tensor([tokens])).logits[0], -1)  # [T, V]


def test_prompt_logprobs_equal_transformers_across_chunks(llm: LLM, ckpt: Path) -> None:
    prompt = random_prompts(1, seed=17, low=60, high=60)[0]  # prefilled in 3 chunks of <= 24 tokens
    out = llm.generate([prompt], SamplingParams(max_tokens=0, prompt_logprobs=2))[0]
    assert out.token_ids == [] and out.finish_reason == "length"
    assert out.prompt_logprobs is not None and len(out.prompt_logprobs) == len(prompt)
    assert out.prompt_logprobs[0] is None  # nothing predicts the first token
    ref = reference_logprobs(ckpt, prompt)
    for i, entry in enumerate(out.prompt_logprobs[1:], start=1):
        assert entry is not None and entry.token == prompt[i]
        assert abs(entry.logprob - ref[i - 1, prompt[i]].item()) < 1e-4
        top_values, top_ids = ref[i - 1].topk(2)
        assert [t for t, _ in entry.top] == top_ids.tolist()
        assert [v for _, v in entry.top] == pytest.approx(top_values.tolist(), abs=1e-4)


def test_scored_prompts_are_not_served_from_the_cache_but_are_scored_once_under_preemption(ckpt: Path) -> None:
    prompts = [p + list(range(40, 60)) for p in random_prompts(12, seed=31, low=2, high=8)]
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, prompt_logprobs=0)
    with LLM(ckpt, single_process=True, block_size=4, num_blocks=8, max_batched_tokens=16, max_seqs=12) as small:
        outs = small.generate(prompts, params)
        assert small.engine.scheduler.num_preemptions > 0
    with LLM(ckpt, single_process=True, block_size=4, num_blocks=256) as roomy:
        ref = roomy.generate(prompts, params)
    for ours, theirs in zip(outs, ref, strict=True):
        assert ours.cached_tokens == 0 and ours.token_ids == theirs.token_ids
        assert ours.prompt_logprobs is not None and theirs.prompt_logprobs is not None
        assert [e and e.token for e in ours.prompt_logprobs] == [e and e.token for e in theirs.prompt_logprobs]
        assert [e.logprob for e in ours.prompt_logprobs[1:] if e] == pytest.approx(
            [e.logprob for e in theirs.prompt_logprobs[1:] if e], abs=1e-4
        )
