"""What real OpenAI-API clients need, through the real Serve app (HTTP and gRPC):

- logprobs exactly as OpenAI shapes them: completions' `tokens / token_logprobs / top_logprobs /
  text_offset`, chat's `content[{token, logprob, bytes, top_logprobs}]`, streamed and not, parsed
  by the openai client, and equal to the engine's own;
- `echo` with `max_tokens: 0` scores the prompt (first logprob null), equal to transformers;
- `n` choices (seeded: choice i equals one request seeded seed + i), batched prompts;
- `/tokenize`, `/detokenize`, `/tokenizer_info` and gRPC Tokenize/Detokenize, under the API key;
- a 2,000-token system prompt sent twice: the second is served from the prefix cache
  (`usage.prompt_tokens_details.cached_tokens`) with the same answer.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import openai
import pytest
import torch
from transformers import MixtralForCausalLM

from cluster.engine.request import SamplingParams
from cluster.llm import LLM
from cluster.proto import inference_pb2 as pb
from cluster.proto import inference_pb2_grpc as pb_grpc
from cluster.serving.messages import token_text
from model import ModelConfig
from tests.support.serving import MODEL, serving

pytestmark = pytest.mark.serve

KEY = "sesame"
TINY = ModelConfig.preset("tiny")  # no sliding window: every cached block is reused
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def ckpt(checkpoint_factory: Any) -> Path:
    return checkpoint_factory(TINY, seed=5)


@pytest.fixture(scope="module")
def server(ckpt: Path) -> Iterator[dict[str, Any]]:
    with serving(ckpt, {"max_model_len": 4096, "kv_cache_gb": 0.05}, serving={"api_key": KEY}) as s:
        yield s


@pytest.fixture(scope="module")
def client(server: dict[str, Any]) -> openai.OpenAI:
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def reference(ckpt: Path) -> Iterator[LLM]:
    with LLM(ckpt, single_process=True) as llm:
        yield llm


def http(server: dict[str, Any], route: str, body: dict[str, Any], key: str | None = KEY) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(server["url"] + route, json=body, headers=headers, timeout=60)


# ---- logprobs ---------------------------------------------------------------------------------


def test_completion_logprobs_have_openais_legacy_shape(client: openai.OpenAI, reference: LLM) -> None:
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=2)
    choice = out.choices[0]
    lp = choice.logprobs
    assert lp is not None and lp.tokens and lp.token_logprobs and lp.top_logprobs and lp.text_offset is not None
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    ours = reference.generate([PROMPT], SamplingParams(max_tokens=5, temperature=0, logprobs=2))[0]
    assert ours.logprobs is not None
    assert lp.token_logprobs == pytest.approx([e.logprob for e in ours.logprobs], abs=1e-5)
    assert lp.tokens == [token_text(reference.tokenizer, t)[0] for t in ours.token_ids]
    assert "".join(lp.tokens) == choice.text  # greedy text, word marks as spaces
    for top, chosen in zip(lp.top_logprobs, lp.token_logprobs, strict=True):
        assert len(top) == 2 and max(top.values()) == pytest.approx(chosen)  # greedy: the chosen is the top one
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0


def test_chat_logprobs_have_openais_shape_streamed_and_not(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Name three colours."}]
    out = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=6, temperature=0, logprobs=True, top_logprobs=2
    )  # type: ignore[call-overload]
    content = out.choices[0].logprobs.content
    assert content is not None and len(content) == out.usage.completion_tokens == 6
    for entry in content:
        assert len(entry.top_logprobs) == 2 and entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
        assert entry.token == entry.top_logprobs[0].token
        assert bytes(entry.bytes).decode("utf-8", errors="replace") == entry.token or entry.token.startswith("bytes:")
    streamed = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=6, temperature=0, logprobs=True, top_logprobs=2, stream=True
    )  # type: ignore[call-overload]
    tokens = [e.token for chunk in streamed for c in chunk.choices if c.logprobs for e in c.logprobs.content or []]
    assert tokens == [e.token for e in content]
    plain = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=3)
    assert plain.choices[0].logprobs is None


def test_echo_scores_the_prompt_like_transformers(server: dict[str, Any], ckpt: Path, reference: LLM) -> None:
    prompt = reference.encode("The quick brown fox jumps over the lazy dog because")
    r = http(server, "/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": 0, "echo": True,
                                          "logprobs": 1})  # fmt: skip
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["text"] == reference.decode(prompt) and r.json()["usage"]["completion_tokens"] == 0
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(prompt) and lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    hf = MixtralForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([prompt])).logits[0], -1)
    expected = [ref[i - 1, prompt[i]].item() for i in range(1, len(prompt))]
    assert lp["token_logprobs"][1:] == pytest.approx(expected, abs=1e-4)
    # lm-evaluation-harness's request: the prompt scored, one token generated after it.
    r = http(server, "/v1/completions", {"model": MODEL, "prompt": [prompt, prompt[:5]], "max_tokens": 1,
                                          "echo": True, "logprobs": 1, "temperature": 0})  # fmt: skip
    choices = r.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1]
    assert [len(c["logprobs"]["token_logprobs"]) for c in choices] == [len(prompt) + 1, 6]
    assert choices[0]["logprobs"]["token_logprobs"][1:-1] == pytest.approx(expected, abs=1e-4)


# ---- n and batches ----------------------------------------------------------------------------


def test_n_choices_are_seeded_per_choice_and_reproducible(client: openai.OpenAI) -> None:
    ask = {"model": MODEL, "prompt": PROMPT, "max_tokens": 8, "temperature": 1.0, "seed": 7}
    two = client.completions.create(n=2, **ask)
    assert [c.index for c in two.choices] == [0, 1] and two.usage.completion_tokens == 16
    assert [c.text for c in client.completions.create(n=2, **ask).choices] == [c.text for c in two.choices]
    second = client.completions.create(**ask | {"seed": 8})
    assert two.choices[1].text == second.choices[0].text  # choice i draws with seed + i
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], n=3,
                                          max_tokens=4, seed=3)  # fmt: skip
    assert sorted(c.index for c in chat.choices) == [0, 1, 2]


def test_a_batch_of_prompts_gets_n_choices_each_numbered_prompt_by_prompt(client: openai.OpenAI) -> None:
    out = client.completions.create(model=MODEL, prompt=[[1, 300, 301], [1, 400, 500]], n=2, max_tokens=3,
                                    temperature=0)  # fmt: skip
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert out.choices[0].text == out.choices[1].text and out.choices[2].text == out.choices[3].text
    assert out.usage.completion_tokens == 12
    single = client.completions.create(model=MODEL, prompt=[1, 400, 500], max_tokens=3, temperature=0)
    assert out.choices[2].text == single.choices[0].text
    streamed = client.completions.create(model=MODEL, prompt=["Hello", "Bonjour"], max_tokens=3, temperature=0,
                                         stream=True)  # fmt: skip
    texts: dict[int, str] = {}
    for chunk in streamed:
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
    assert sorted(texts) == [0, 1] and all(texts.values())


# ---- tokenizing ---------------------------------------------------------------------------------


def test_tokenize_and_detokenize_round_trip_under_the_api_key(server: dict[str, Any], reference: LLM) -> None:
    r = http(server, "/tokenize", {"model": MODEL, "prompt": "Hello world"})
    assert r.status_code == 200 and r.json()["tokens"] == reference.encode("Hello world")
    assert r.json()["count"] == len(r.json()["tokens"]) and r.json()["max_model_len"] == 4096
    bare = http(server, "/tokenize", {"prompt": "Hello world", "add_special_tokens": False}).json()["tokens"]
    assert bare == reference.encode("Hello world")[1:]
    messages = [{"role": "user", "content": "Hi!"}]
    assert http(server, "/tokenize", {"messages": messages}).json()["tokens"] == reference.encode_chat(messages)
    assert http(server, "/detokenize", {"tokens": bare}).json() == {"prompt": "Hello world"}
    info = httpx.get(server["url"] + "/tokenizer_info", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert info["eos_token"] == "</s>" and info["bos_token"] == "<s>"
    assert http(server, "/tokenize", {"prompt": "x"}, key=None).status_code == 401
    assert httpx.get(server["url"] + "/tokenizer_info").status_code == 401
    for route, body, param in [("/tokenize", {"prompt": 5}, "prompt"), ("/tokenize", {}, None),
                               ("/detokenize", {"tokens": [1, 99999]}, "tokens"),
                               ("/detokenize", {"tokens": "no"}, "tokens")]:  # fmt: skip
        r = http(server, route, body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_grpc_tokenize_and_detokenize(server: dict[str, Any], reference: LLM) -> None:
    auth = [("authorization", f"Bearer {KEY}")]
    with grpc.insecure_channel(server["grpc"]) as channel:
        stub = pb_grpc.InferenceStub(channel)
        tokens = stub.Tokenize(pb.TokenizeRequest(prompt="Hello world"), metadata=auth)
        assert list(tokens.tokens) == reference.encode("Hello world") and tokens.count == len(tokens.tokens)
        chat = stub.Tokenize(pb.TokenizeRequest(messages=[pb.ChatMessage(role="user", content="Hi!")]), metadata=auth)
        assert list(chat.tokens) == reference.encode_chat([{"role": "user", "content": "Hi!"}])
        text = stub.Detokenize(pb.DetokenizeRequest(tokens=tokens.tokens[1:]), metadata=auth)
        assert text.text == "Hello world"
        with pytest.raises(grpc.RpcError) as e:
            stub.Tokenize(pb.TokenizeRequest(prompt="x"))
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED


# ---- the prefix cache -------------------------------------------------------------------------


def test_a_long_system_prompt_sent_twice_is_prefilled_once(client: openai.OpenAI) -> None:
    system = " ".join(f"Rule {i}: answer briefly and politely." for i in range(250))  # ~2,000 tokens
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "What is 2 + 2?"}]
    first = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)
    second = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)
    assert first.usage.prompt_tokens > 2000
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert second.usage.prompt_tokens_details.cached_tokens > 0.9 * second.usage.prompt_tokens
    assert second.choices[0].message.content == first.choices[0].message.content
    streamed = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0,
                                              stream=True, stream_options={"include_usage": True})  # fmt: skip
    last = [c for c in streamed][-1]
    assert last.usage is not None and last.usage.prompt_tokens_details.cached_tokens > 2000


def test_raw_stream_chunks_carry_completion_logprobs_and_echo(server: dict[str, Any]) -> None:
    body = {"model": MODEL, "prompt": [1, 400, 500, 600], "max_tokens": 3, "temperature": 0, "echo": True,
            "logprobs": 1, "stream": True}  # fmt: skip
    with httpx.stream("POST", server["url"] + "/v1/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as r:  # fmt: skip
        chunks = [json.loads(ln[6:]) for ln in r.iter_lines() if ln.startswith("data: ") and ln != "data: [DONE]"]
    first = chunks[0]["choices"][0]
    assert first["logprobs"]["token_logprobs"][0] is None and len(first["logprobs"]["tokens"]) == 4  # the echo
    generated = [t for c in chunks[1:] for t in c["choices"][0]["logprobs"]["token_logprobs"]]
    assert len(generated) == 3 and all(isinstance(v, float) for v in generated)


def test_rebalancing_is_an_admin_route_under_the_api_key(server: dict[str, Any]) -> None:
    assert http(server, "/admin/rebalance", {}, key="wrong").status_code == 401
    r = http(server, "/admin/rebalance", {})
    assert r.status_code == 200, r.text
    report = r.json()
    assert {"imbalance_before", "imbalance_after", "moved", "placement"} <= set(report)
    assert len(report["placement"]) == TINY.num_layers and all(len(layer) == 2 for layer in report["placement"])
