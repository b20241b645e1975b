"""The engine on its single-process backend: batching, stopping, streaming, aborts, preemption."""

from __future__ import annotations

import asyncio

import pytest
import torch

from cluster.engine.request import SamplingParams
from cluster.llm import LLM
from model import load_model
from tests.support.common import ENGINE_CONFIG, idle, random_prompts, reference_greedy, staggered_streams

pytestmark = pytest.mark.unit

GREEDY = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def ckpt(checkpoint_factory):
    return checkpoint_factory(ENGINE_CONFIG, seed=5)


@pytest.fixture(scope="module")
def llm(ckpt):
    engine = LLM(ckpt, single_process=True, block_size=4, num_blocks=256, max_batched_tokens=24)
    yield engine
    engine.shutdown()


def test_greedy_equals_reference_with_chunked_prefill(llm: LLM, ckpt) -> None:
    prompts = random_prompts(6, seed=1, low=2, high=60)  # several longer than the 24-token budget and the window
    outs = llm.generate(prompts, GREEDY)
    assert [o.token_ids for o in outs] == reference_greedy(ckpt, prompts, 16)
    assert all(o.finish_reason == "length" and o.finished for o in outs)
    texts = [llm.tokenizer.continuation(p, o.token_ids) for p, o in zip(prompts, outs, strict=True)]
    assert [o.text for o in outs] == texts
    assert idle(llm.stats()) == {"running": 0, "waiting": 0, "blocks_in_use": 0}


def test_text_prompts_are_tokenized_with_bos(llm: LLM, ckpt) -> None:
    out = llm.generate(["The capital of France is"], GREEDY)[0]
    assert out.prompt_token_ids == llm.tokenizer.encode("The capital of France is")
    assert out.prompt_token_ids[0] == 1
    assert out.token_ids == reference_greedy(ckpt, [out.prompt_token_ids], 16)[0]
    # The completion reads on from the prompt: its first word keeps its leading space.
    assert out.text == llm.tokenizer.continuation(out.prompt_token_ids, out.token_ids)
    assert llm.tokenizer.decode(out.prompt_token_ids + out.token_ids) == "The capital of France is" + out.text


def test_stop_strings_and_stop_tokens(llm: LLM) -> None:
    prompt = random_prompts(1, seed=2)[0]
    free = llm.generate([prompt], GREEDY)[0]
    stop = free.text[len(free.text) // 2 : len(free.text) // 2 + 3]
    assert stop and len(free.text) > 8
    cut = llm.generate([prompt], GREEDY.model_copy(update={"stop": [stop]}))[0]
    assert cut.finish_reason == "stop"
    assert cut.text == free.text[: free.text.index(stop)]
    assert free.token_ids[: len(cut.token_ids)] == cut.token_ids
    token = free.token_ids[5]
    by_id = llm.generate([prompt], GREEDY.model_copy(update={"stop_token_ids": [token]}))[0]
    first = free.token_ids.index(token)
    assert by_id.finish_reason == "stop" and by_id.token_ids == free.token_ids[: first + 1]
    assert by_id.text == llm.tokenizer.continuation(prompt, free.token_ids[:first])  # the stop token adds none


def test_logprobs_are_those_of_the_reference_model(llm: LLM, ckpt) -> None:
    prompt = random_prompts(1, seed=4, low=10, high=10)[0]
    out = llm.generate([prompt], GREEDY.model_copy(update={"logprobs": 3, "max_tokens": 5}))[0]
    model = load_model(ckpt)
    full = torch.tensor(prompt + out.token_ids)
    with torch.no_grad():
        logits = model(full, torch.arange(len(full)), [len(full)])
    assert out.logprobs is not None and [e.token for e in out.logprobs] == out.token_ids
    for i, entry in enumerate(out.logprobs):
        lp = torch.log_softmax(logits[len(prompt) - 1 + i], -1)  # the row that predicted token i
        assert entry.logprob == pytest.approx(lp[entry.token].item(), abs=1e-4)
        top_values, top_ids = lp.topk(3)
        assert [t for t, _ in entry.top] == top_ids.tolist()
        assert [v for _, v in entry.top] == pytest.approx(top_values.tolist(), abs=1e-4)
        assert entry.top[0][0] == entry.token  # greedy: the chosen token is the most likely


def test_invalid_requests_are_refused(llm: LLM) -> None:
    with pytest.raises(ValueError, match="prompt is empty"):
        llm.generate([[]], GREEDY)
    with pytest.raises(ValueError, match=r"exceeds the context length 4096"):
        llm.generate([[1] * 4000], GREEDY.model_copy(update={"max_tokens": 200}))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.generate([[1, 40000]], GREEDY)
    assert llm.stats()["blocks_in_use"] == 0
    assert llm.generate([[1, 2, 3]], GREEDY)[0].finished  # still serving


def test_stream_deltas_concatenate_and_requests_join_mid_decode(llm: LLM, ckpt) -> None:
    prompts = random_prompts(3, seed=6, low=5, high=30)
    results = staggered_streams(llm, prompts, GREEDY)
    reference = reference_greedy(ckpt, prompts, 16)
    for (tokens, text, final_text), ref, prompt in zip(results, reference, prompts, strict=True):
        assert tokens == ref
        assert text == final_text == llm.tokenizer.continuation(prompt, ref)


def test_closing_a_stream_aborts_and_frees_blocks(llm: LLM) -> None:
    async def run() -> dict[str, int]:
        stream = llm.stream(
            random_prompts(1, seed=7, low=30, high=30)[0], GREEDY.model_copy(update={"max_tokens": 500})
        )
        seen = 0
        async for _ in stream:
            seen += 1
            if seen == 3:
                during = llm.stats()
                assert during["running"] == 1 and during["blocks_in_use"] > 0
                break
        await stream.aclose()
        return llm.stats()

    after = asyncio.run(run())
    assert idle(after) == {"running": 0, "waiting": 0, "blocks_in_use": 0}


def test_seeded_sampling_is_reproducible(llm: LLM) -> None:
    params = SamplingParams(max_tokens=20, temperature=0.9, top_p=0.95, top_k=50, seed=42, ignore_eos=True)
    prompts = random_prompts(3, seed=8)
    first = [o.token_ids for o in llm.generate(prompts, params)]
    again = [o.token_ids for o in llm.generate(list(reversed(prompts)), params)]
    assert first == list(reversed(again))  # per request, whatever else is in the batch
    other = [o.token_ids for o in llm.generate(prompts, params.model_copy(update={"seed": 7}))]
    assert other != first


def test_many_requests_under_a_small_block_budget(ckpt) -> None:
    """200 random requests, a cache that holds a few of them: preemption happens, all answers are right."""
    prompts = random_prompts(200, seed=9, low=1, high=40)
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    with LLM(ckpt, single_process=True, block_size=4, num_blocks=40, max_batched_tokens=64, max_seqs=32) as small:
        outs = small.generate(prompts, params)
        assert small.engine.scheduler.num_preemptions > 0
        assert small.stats()["blocks_in_use"] == 0
    assert [o.token_ids for o in outs] == reference_greedy(ckpt, prompts, 8)


def test_expert_counts_cover_every_routed_token(ckpt) -> None:
    with LLM(checkpoint=ckpt, single_process=True) as fresh:  # the checkpoint as a keyword, as the README says
        outs = fresh.generate(random_prompts(4, seed=10), GREEDY)
        counts = fresh.expert_token_counts()
    # every token fed (prompt + all sampled but the last) is routed to K experts in every layer
    fed = sum(len(o.prompt_token_ids) + len(o.token_ids) - 1 for o in outs)
    assert counts.shape == (ENGINE_CONFIG.num_layers, ENGINE_CONFIG.num_experts)
    assert counts.sum(1).tolist() == [fed * ENGINE_CONFIG.experts_per_token] * ENGINE_CONFIG.num_layers


def test_an_llm_without_a_checkpoint_says_so() -> None:
    with pytest.raises(TypeError, match="checkpoint"):
        LLM(single_process=True)


def test_a_failing_call_on_the_loop_reaches_the_caller_and_the_engine_serves_on(llm: LLM) -> None:
    with pytest.raises(ZeroDivisionError):
        llm._loop.call(lambda: 1 / 0)
    out = llm.generate([[1, 5, 6]], SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))
    assert len(out[0].token_ids) == 3


def test_a_batch_of_prompts_is_scheduled_in_the_first_step(llm: LLM) -> None:
    llm.profile(True)
    llm.generate([[1, 5, 6, 7]] * 4, SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))
    records = llm.step_profile()["engine"]
    llm.profile(False)
    assert len(records) == 2  # one prefill step for all four prompts, one decode step
