"""Sampling controls and structured outputs in the engine (one process and a Ray copy):

- presence, frequency and repetition penalties equal their formulas applied to transformers'
  logits of the tiny model, step by step (greedy, so each step's argmax is the check);
- logit_bias +100 makes every token that token; min_p 1.0 is greedy; min_tokens holds eos and the
  stop tokens back; banned ids never appear;
- a JSON schema holds for every choice of an `n` > 1 request, under preemption (KV blocks too few
  for the batch), with prefix caching, and over the Ray data plane;
- a grammar that cannot be compiled is refused naming its field; tools on a v1 model are refused.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import torch
from transformers import MixtralForCausalLM

from cluster.engine.request import RequestError, SamplingParams
from cluster.engine.structured import StructuredOutput
from cluster.llm import LLM
from cluster.serving.config import ServeConfig
from cluster.serving.messages import Failure, GenerateCall
from model import DrawParams, ModelConfig, generate, load_model
from model.sampling import adjust
from tests.support.common import local_ray, random_prompts

pytestmark = pytest.mark.serve

TINY = ModelConfig.preset("tiny")
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "size": {"type": "integer", "minimum": 1, "maximum": 9},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
        "box": {"type": "object", "properties": {"w": {"type": "number", "minimum": 0, "maximum": 10}},
                "required": ["w"], "additionalProperties": False},
    },
    "required": ["name", "size", "color", "tags", "box"],
    "additionalProperties": False,
}  # fmt: skip


@pytest.fixture(scope="module")
def ckpt(checkpoint_factory: Any) -> Path:
    return checkpoint_factory(TINY, seed=3)


@pytest.fixture(scope="module")
def llm(ckpt: Path) -> Iterator[LLM]:
    with LLM(ckpt, single_process=True, block_size=4, num_blocks=512) as engine:
        yield engine


def reference_penalised(ckpt: Path, prompt: list[int], steps: int, presence: float, frequency: float,
                        repetition: float) -> list[int]:  # fmt: skip
    """Greedy tokens from transformers' logits with the penalties written out as their formulas:
    CTRL's repetition penalty over the prompt and the output, then OpenAI's
    `logit -= count * frequency + (count > 0) * presence` over the output."""
    hf = MixtralForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    out: list[int] = []
    with torch.no_grad():
        for _ in range(steps):
            logits = hf(torch.tensor([prompt + out])).logits[0, -1].clone()
            for t in set(prompt + out):
                logits[t] = logits[t] / repetition if logits[t] > 0 else logits[t] * repetition
            for t, c in Counter(out).items():
                logits[t] -= c * frequency + presence
            out.append(int(logits.argmax()))
    return out


# Negative penalties (and r < 1) reward what was said: on a random model, whose greedy tokens rarely
# repeat, that is what makes them change the output, so each case checks the formula for real.
@pytest.mark.parametrize(("presence", "frequency", "repetition"), [(-2.0, 0.0, 1.0), (0.0, -1.0, 1.0), (0.0, 0.0, 0.2),
                                                                   (-1.0, 0.5, 0.5)])  # fmt: skip
def test_penalties_follow_their_formulas(llm: LLM, ckpt: Path, presence: float, frequency: float,
                                         repetition: float) -> None:  # fmt: skip
    prompt = random_prompts(1, seed=11, low=6, high=6)[0]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, presence_penalty=presence,
                            frequency_penalty=frequency, repetition_penalty=repetition)  # fmt: skip
    got = llm.generate([prompt], params)[0].token_ids
    assert got == reference_penalised(ckpt, prompt, 24, presence, frequency, repetition)
    free = llm.generate([prompt], SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True))[0].token_ids
    assert got != free  # the penalties changed what it says


def test_adjust_is_the_formula_on_one_row() -> None:
    logits = torch.tensor([2.0, -1.0, 0.5, 3.0, -2.0])
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25, repetition_penalty=2.0,
                            logit_bias={4: 10.0})  # fmt: skip
    got = adjust(logits, params, output=[3, 3, 1], prompt=[0], banned=[2])
    # token 0 (prompt): 2 / 2; 1 (output once): -1 * 2 - 0.25 - 0.5; 2 banned; 3 (twice): 3 / 2 - 0.5 - 0.5;
    # 4: -2 + 10, then not seen
    assert got.tolist() == [1.0, -2.75, float("-inf"), 0.5, 8.0]


def test_logit_bias_min_p_min_tokens_and_banned_ids(llm: LLM) -> None:
    prompt = random_prompts(1, seed=12)[0]
    forced = llm.generate([prompt], SamplingParams(max_tokens=8, temperature=1.0, logit_bias={777: 100.0}))[0]
    assert forced.token_ids == [777] * 8
    greedy = llm.generate([prompt], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))[0]
    top_only = llm.generate([prompt], SamplingParams(max_tokens=8, temperature=1.0, min_p=1.0, ignore_eos=True,
                                                     seed=1))[0]  # fmt: skip
    assert top_only.token_ids == greedy.token_ids  # min_p 1.0 keeps the most likely token alone
    stop = greedy.token_ids[1]
    early = llm.generate([prompt], SamplingParams(max_tokens=8, temperature=0.0, stop_token_ids=[stop]))[0]
    assert len(early.token_ids) == 2 and early.finish_reason == "stop"
    held = llm.generate([prompt], SamplingParams(max_tokens=8, temperature=0.0, stop_token_ids=[stop],
                                                 min_tokens=6))[0]  # fmt: skip
    assert len(held.token_ids) >= 6 and stop not in held.token_ids[:6]
    banned = llm.generate([prompt], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True,
                                                   bad_token_ids=list(set(greedy.token_ids))))[0]  # fmt: skip
    assert not set(banned.token_ids) & set(greedy.token_ids)


def test_out_of_range_controls_are_refused_naming_them(llm: LLM) -> None:
    for params, param in [
        (SamplingParams(logit_bias={40000: 5.0}), "logit_bias"),
        (SamplingParams(bad_token_ids=[40000]), "bad_token_ids"),
        (SamplingParams(max_tokens=4, min_tokens=5), "min_tokens"),
    ]:
        with pytest.raises(RequestError) as e:
            llm.generate([[1, 5, 6]], params)
        assert e.value.param == param
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias={5: 101.0})
    with pytest.raises(ValueError, match="bad_token_ids"):
        SamplingParams(bad_token_ids=[-1])


def test_the_reference_generation_draws_as_the_engine_under_every_setting(llm: LLM, ckpt: Path) -> None:
    """`model.generate` applies logit bias, banned ids and penalties as a shard does (it ignored
    them): greedy under all of them at once, both give the same tokens."""
    prompt = random_prompts(1, seed=14)[0]
    greedy = llm.generate([prompt], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))[0].token_ids
    draw = DrawParams(temperature=0.0, frequency_penalty=1.5, presence_penalty=0.5, repetition_penalty=1.3,
                      bad_token_ids=greedy[:2], logit_bias={greedy[3]: 4.0})  # fmt: skip
    engine = llm.generate([prompt], SamplingParams(max_tokens=12, ignore_eos=True, **draw.model_dump()))[0].token_ids
    reference = generate(load_model(ckpt), [prompt], draw, max_tokens=12, eos_id=None)[0]
    assert reference == engine
    assert reference != greedy and not set(reference) & set(greedy[:2])


def json_params(n: int, seed: int, max_tokens: int = 160) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=1.0, n=n, seed=seed,
                          structured=StructuredOutput.json_schema(SCHEMA))  # fmt: skip


def test_every_choice_follows_the_schema_under_preemption(ckpt: Path) -> None:
    """48 blocks of 4 tokens for 8 requests x 3 choices that each need ~25 blocks: the scheduler
    preempts and recomputes sequences, and every matcher stays with its tokens."""
    prompts = random_prompts(8, seed=13, low=10, high=30)
    with LLM(ckpt, single_process=True, block_size=4, num_blocks=48, max_model_len=256) as small:
        outs = small.generate(prompts, json_params(3, seed=4))
        assert small.engine.scheduler.num_preemptions > 0
    assert len(outs) == 24
    for o in outs:
        assert o.finish_reason == "stop", o.text
        jsonschema.validate(json.loads(o.text), SCHEMA)
    assert len({o.text for o in outs}) > 12  # sampled, not one answer repeated


def test_structured_output_over_the_ray_data_plane(ckpt: Path) -> None:
    prompts = random_prompts(4, seed=14)
    params = json_params(2, seed=9)
    with LLM(ckpt, single_process=True) as one:
        expected = [o.text for o in one.generate(prompts, params)]
    local_ray()
    with LLM(ckpt, attention_shards=2, routers=1, expert_groups=2) as copy:
        got = [o.text for o in copy.generate(prompts, params)]
    assert got == expected  # seeded: the same draws under the same masks
    for text in got:
        jsonschema.validate(json.loads(text), SCHEMA)


def test_a_grammar_that_does_not_compile_is_refused_naming_its_field(llm: LLM) -> None:
    bad = StructuredOutput.json_schema({"type": "object", "properties": {"a": {"type": "strng"}}},
                                       "response_format.json_schema.schema")  # fmt: skip
    with pytest.raises(RequestError) as e:
        llm.generate([[1, 5]], SamplingParams(structured=bad))
    assert e.value.param == "response_format.json_schema.schema" and "strng" in e.value.message
    regex = StructuredOutput(kind="regex", spec="(unclosed", param="structured_outputs.regex")
    with pytest.raises(RequestError) as e:
        llm.generate([[1, 5]], SamplingParams(structured=regex))
    assert e.value.param == "structured_outputs.regex"
    choice = llm.generate([[1, 5]], SamplingParams(temperature=1.0, max_tokens=20, structured=StructuredOutput(
        kind="choice", spec=json.dumps(["yes", "no", "maybe later"]))))[0]  # fmt: skip
    assert choice.text in ("yes", "no", "maybe later") and choice.finish_reason == "stop"


def test_tools_on_a_v1_model_are_refused(checkpoint_factory: Any) -> None:
    """Mixtral 8x7B Instruct's v1 format has no tool tokens: `tools` is a 400 that says so."""
    from cluster.serving.llm_server import LLMServer
    from cluster.serving.openai_protocol import ChatMessage, Tool

    v1 = checkpoint_factory(TINY.model_copy(update={"vocab_size": 32000}), seed=1)
    cfg = ServeConfig.model_validate({"model": {"checkpoint": str(v1)}, "cluster": {"single_process": True}})
    local_ray()  # outside Serve the server asks Ray for its placement group
    server = LLMServer(cfg)
    try:
        tool = Tool.model_validate({"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}})
        call = GenerateCall(id="r", messages=[ChatMessage(role="user", content="hi")], params=SamplingParams(),
                            tools=[tool])  # fmt: skip

        async def answers_of() -> list[Any]:
            return [a async for a in server.stream(call)]

        answers = asyncio.run(answers_of())
        assert len(answers) == 1 and isinstance(answers[0], Failure)
        assert answers[0].status == 400 and answers[0].param == "tools" and "v1" in answers[0].message
    finally:
        server.llm.shutdown()
