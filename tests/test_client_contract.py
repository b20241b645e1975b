"""What apps and agents send, through the real Serve app (A=1 R=1 G=2 over Ray), the openai client,
LangChain's `ChatOpenAI` and a real gRPC channel:

- content parts and the developer role; an agent loop's history (assistant `tool_calls`, a `tool`
  result, a follow-up) whose prompt tokens equal mistral-common's own encoding;
- `tool_choice` required and named: calls whose arguments validate against the function's schema
  (`jsonschema`), whole and streamed (reassembled by the openai client's stream helper);
  `none` never calls; `auto` output that is no valid call comes back as content;
- `json_schema` with a nested schema, 20 samples at temperature 1.0, all valid; `json_object`;
  vLLM's `structured_outputs` / `guided_*` on completions;
- `logit_bias` +100 makes every token that token; the penalties reach the engine;
- every unsupported field gets a 400 naming it; fields that cannot change the output are accepted;
- lm-evaluation-harness's `local-completions` with the server's tokenizer: loglikelihoods and
  greedy generations equal transformers'.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import jsonschema
import openai
import pytest
import torch
import yaml
from mistral_common.protocol.instruct.messages import (
    AssistantMessage,
    SystemMessage,
    TextChunk,
    ToolMessage,
    UserMessage,
)
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.tool_calls import Function, FunctionCall, Tool, ToolCall
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from pydantic import BaseModel, Field
from transformers import MixtralForCausalLM

from cluster.engine.request import SamplingParams
from cluster.llm import LLM
from cluster.proto import inference_pb2 as pb
from cluster.proto import inference_pb2_grpc as pb_grpc
from model import ModelConfig, Tokenizer
from model.tokenizer import DEFAULT_TOKENIZER
from tests.support.common import readme_blocks, run_example
from tests.support.serving import MODEL, serving

pytestmark = pytest.mark.serve
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # lm-eval's tasks read files this module writes
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TINY = ModelConfig.preset("tiny")
WEATHER = {
    "name": "get_weather",
    "description": "The weather in a city",
    "parameters": {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 16},
            "unit": {"enum": ["celsius", "fahrenheit"]},
            "days": {"type": "integer", "minimum": 1, "maximum": 7},
        },
        "required": ["city", "unit", "days"],
        "additionalProperties": False,
    },
}
SEARCH = {
    "name": "search",
    "description": "Search the web",
    "parameters": {"type": "object", "properties": {"query": {"type": "string", "maxLength": 20}},
                   "required": ["query"], "additionalProperties": False},
}  # fmt: skip
TOOLS = [{"type": "function", "function": WEATHER}, {"type": "function", "function": SEARCH}]
SCHEMAS = {"get_weather": WEATHER["parameters"], "search": SEARCH["parameters"]}
NESTED = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 12},
        "rating": {"type": "number", "minimum": 0, "maximum": 5},
        "genre": {"enum": ["drama", "comedy", "horror"]},
        "cast": {"type": "array", "maxItems": 3, "items": {
            "type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                             "age": {"type": "integer", "minimum": 0, "maximum": 99}},
            "required": ["name", "age"], "additionalProperties": False}},
    },
    "required": ["title", "rating", "genre", "cast"],
    "additionalProperties": False,
}  # fmt: skip


@pytest.fixture(scope="module")
def ckpt(checkpoint_factory: Any) -> Path:
    return checkpoint_factory(TINY, seed=5)


@pytest.fixture(scope="module")
def server(ckpt: Path) -> Iterator[dict[str, Any]]:
    with serving(ckpt, {"max_model_len": 1024, "kv_cache_gb": 0.05}) as s:
        yield s


@pytest.fixture(scope="module")
def client(server: dict[str, Any]) -> openai.OpenAI:
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def mistral() -> MistralTokenizer:
    return MistralTokenizer.from_file(str(DEFAULT_TOKENIZER))


def post(server: dict[str, Any], route: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(server["url"] + route, json=body, timeout=60)


def check_calls(message: Any, names: set[str], most: int | None = None) -> None:
    """Every call is one of `names`, with a Mistral-format id and arguments valid for its schema."""
    assert message.tool_calls, message
    assert most is None or len(message.tool_calls) <= most
    for call in message.tool_calls:
        assert call.type == "function" and call.function.name in names
        assert len(call.id) == 9 and call.id.isalnum()
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


# ---- the chat message contract ----------------------------------------------------------------


def test_content_parts_and_the_developer_role_encode_as_mistral_common_does(
    server: dict[str, Any], client: openai.OpenAI, mistral: MistralTokenizer
) -> None:
    parts = [{"type": "text", "text": "Hello"}, {"type": "text", "text": "there"}]
    messages: Any = [{"role": "developer", "content": "Answer briefly."}, {"role": "user", "content": parts}]
    chunks = [TextChunk(text="Hello"), TextChunk(text="there")]
    expected = mistral.encode_chat_completion(ChatCompletionRequest(messages=[
        SystemMessage(content="Answer briefly."), UserMessage(content=chunks),  # type: ignore[arg-type]
    ])).tokens  # fmt: skip
    out = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4)
    assert out.usage is not None and out.usage.prompt_tokens == len(expected)
    assert post(server, "/tokenize", {"messages": messages}).json()["tokens"] == expected


def test_an_agent_loop_encodes_as_mistral_common_does(
    server: dict[str, Any], client: openai.OpenAI, mistral: MistralTokenizer
) -> None:
    question = {"role": "user", "content": "What is the weather in Paris?"}
    first = client.chat.completions.create(model=MODEL, messages=[question], tools=TOOLS,  # type: ignore[list-item]
                                           tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                           parallel_tool_calls=False, max_tokens=200, seed=0)  # fmt: skip
    assert first.choices[0].finish_reason == "tool_calls", first
    (call,) = first.choices[0].message.tool_calls or []
    history: Any = [
        question,
        first.choices[0].message.model_dump(exclude_none=True),  # as an agent sends it back
        {"role": "tool", "tool_call_id": call.id, "content": "22 degrees and sunny"},
        {"role": "user", "content": "And tomorrow?"},
    ]
    follow = client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, max_tokens=8)  # type: ignore[list-item]
    expected = mistral.encode_chat_completion(ChatCompletionRequest(
        messages=[
            UserMessage(content="What is the weather in Paris?"),
            AssistantMessage(tool_calls=[ToolCall(id=call.id, function=FunctionCall(
                name="get_weather", arguments=call.function.arguments))]),
            ToolMessage(content="22 degrees and sunny", tool_call_id=call.id),
            UserMessage(content="And tomorrow?"),
        ],
        tools=[Tool(function=Function(**WEATHER)), Tool(function=Function(**SEARCH))],  # type: ignore[arg-type]
    )).tokens  # fmt: skip
    assert follow.usage is not None and follow.usage.prompt_tokens == len(expected)
    assert post(server, "/tokenize", {"messages": history, "tools": TOOLS}).json()["tokens"] == expected
    assert follow.choices[0].finish_reason in ("stop", "length", "tool_calls")


# ---- tool calls --------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_forced_tool_calls_validate_against_their_schemas(client: openai.OpenAI, seed: int) -> None:
    ask: Any = {"model": MODEL, "messages": [{"role": "user", "content": "Weather in Oslo, and news?"}],
                "tools": TOOLS, "max_tokens": 400, "temperature": 1.0, "seed": seed}  # fmt: skip
    required = client.chat.completions.create(tool_choice="required", **ask)
    assert required.choices[0].finish_reason == "tool_calls" and required.choices[0].message.content is None
    check_calls(required.choices[0].message, {"get_weather", "search"})
    one = client.chat.completions.create(tool_choice="required", parallel_tool_calls=False, **ask)
    check_calls(one.choices[0].message, {"get_weather", "search"}, most=1)
    named = {"type": "function", "function": {"name": "search"}}
    with client.chat.completions.stream(tool_choice=named, **ask) as stream:  # type: ignore[arg-type]
        streamed = stream.get_final_completion()
    assert streamed.choices[0].finish_reason == "tool_calls"
    check_calls(streamed.choices[0].message, {"search"})


def test_tool_choice_none_never_calls_and_auto_falls_back_to_content(client: openai.OpenAI) -> None:
    """`logit_bias` pushes the `[TOOL_CALLS]` token (id 5) to the top: under `none` it is banned all
    the same; under `auto` the model then says nothing that parses as calls, which comes back as
    (empty) content with a 200, not a 500."""
    ask: Any = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "tools": TOOLS, "max_tokens": 6,
                "temperature": 0, "logit_bias": {"5": 100}}  # fmt: skip
    none = client.chat.completions.create(tool_choice="none", **ask)
    assert none.choices[0].message.tool_calls is None and none.choices[0].finish_reason == "length"
    assert none.choices[0].message.content
    auto = client.chat.completions.create(**ask)
    assert auto.choices[0].message.tool_calls is None and auto.choices[0].finish_reason == "length"
    assert auto.choices[0].message.content == ""


# ---- structured outputs ------------------------------------------------------------------------


def test_a_nested_json_schema_holds_for_20_samples(client: openai.OpenAI) -> None:
    fmt: Any = {"type": "json_schema", "json_schema": {"name": "movie", "schema": NESTED, "strict": True}}
    texts = []
    for seed in (3, 4):
        out = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "A movie, as JSON"}],
                                             response_format=fmt, n=10, temperature=1.0, seed=seed,
                                             max_tokens=200)  # fmt: skip
        assert all(c.finish_reason == "stop" for c in out.choices)
        texts += [c.message.content or "" for c in out.choices]
    assert len(texts) == 20 and len(set(texts)) > 10
    for text in texts:
        jsonschema.validate(json.loads(text), NESTED)
    obj = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "JSON"}],
                                         response_format={"type": "json_object"}, max_tokens=200)  # fmt: skip
    if obj.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(obj.choices[0].message.content or ""), dict)
    else:  # a free object may run past max_tokens; what there is starts as one
        assert (obj.choices[0].message.content or "").startswith("{")


def test_completions_take_vllms_structured_outputs(server: dict[str, Any]) -> None:
    base = {"model": MODEL, "prompt": "Answer:", "max_tokens": 40, "temperature": 1.0, "seed": 0}
    for field, check in [
        ({"structured_outputs": {"regex": "[a-z]{3}-[0-9]{2}"}}, lambda t: len(t) == 6 and t[3] == "-"),
        ({"guided_choice": ["alpha", "beta"]}, lambda t: t in ("alpha", "beta")),
        ({"guided_json": NESTED}, lambda t: jsonschema.validate(json.loads(t), NESTED) is None),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "m", "schema": NESTED}}},
         lambda t: jsonschema.validate(json.loads(t), NESTED) is None),
    ]:  # fmt: skip
        r = post(server, "/v1/completions", base | field | {"max_tokens": 200})
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] == "stop" and check(choice["text"]), (field, choice)


# ---- sampling controls -------------------------------------------------------------------------


def test_logit_bias_and_penalties_reach_the_engine(server: dict[str, Any], client: openai.OpenAI, ckpt: Path) -> None:
    out = client.completions.create(model=MODEL, prompt="Once upon", max_tokens=8, temperature=1.0,
                                    logit_bias={"777": 100}, logprobs=0)  # fmt: skip
    assert out.choices[0].logprobs is not None
    assert out.choices[0].logprobs.tokens == [post(server, "/detokenize", {"tokens": [777]}).json()["prompt"]] * 8
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=5,
                                          logit_bias={"777": 100}, temperature=0.5)  # fmt: skip
    assert chat.choices[0].message.content == post(server, "/detokenize", {"tokens": [777] * 5}).json()["prompt"]
    controls = {"presence_penalty": -2.0, "frequency_penalty": 0.5, "repetition_penalty": 0.5, "min_tokens": 6}
    r = post(server, "/v1/completions", {"model": MODEL, "prompt": [1, 851, 3737], "max_tokens": 12,
                                         "temperature": 0} | controls)  # fmt: skip
    with LLM(ckpt, single_process=True) as reference:
        params = SamplingParams(max_tokens=12, temperature=0.0, **controls)  # type: ignore[arg-type]
        assert r.json()["choices"][0]["text"] == reference.generate([[1, 851, 3737]], params)[0].text


# ---- refused and accepted fields ---------------------------------------------------------------

HI = [{"role": "user", "content": "hi"}]
REFUSED = [
    ("chat", {"bogus_field": 1}, "bogus_field"),
    ("chat", {"functions": [WEATHER]}, "functions"),
    ("chat", {"audio": {"voice": "alloy"}}, "audio"),
    ("chat", {"prediction": {"type": "content", "content": "x"}}, "prediction"),
    ("chat", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages.0.content"),
    ("chat", {"messages": [{"role": "user", "content": "hi", "name": "bob"}]}, "messages.0.name"),
    ("chat", {"messages": [{"role": "tool", "content": "22"}]}, "messages.0.tool_call_id"),
    ("chat", {"tool_choice": "required"}, "tool_choice"),
    ("chat", {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ("chat", {"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
     "response_format"),
    ("chat", {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strng"}}}},
     "response_format.json_schema.schema"),
    ("chat", {"logit_bias": {"abc": 1}}, "logit_bias"),
    ("chat", {"logit_bias": {"5": 200}}, "logit_bias"),
    ("chat", {"logit_bias": {"99999": 1}}, "logit_bias"),
    ("chat", {"presence_penalty": 3.0}, "presence_penalty"),
    ("chat", {"min_tokens": 50, "max_tokens": 10}, "min_tokens"),
    ("completions", {"suffix": "end"}, "suffix"),
    ("completions", {"best_of": 2}, "best_of"),
    ("completions", {"guided_json": NESTED, "guided_regex": "a+"}, "guided_regex"),
    ("completions", {"structured_outputs": {"regex": "(a"}}, "structured_outputs.regex"),
]  # fmt: skip


@pytest.mark.parametrize(("route", "field", "param"), REFUSED, ids=[p for _, _, p in REFUSED])
def test_each_unsupported_field_gets_a_400_naming_it(server: dict[str, Any], route: str, field: dict[str, Any],
                                                     param: str) -> None:  # fmt: skip
    body = {"model": MODEL, "max_tokens": 4} | ({"messages": HI} if route == "chat" else {"prompt": "hi"}) | field
    r = post(server, "/v1/chat/completions" if route == "chat" else "/v1/completions", body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.json()


def test_fields_that_cannot_change_the_output_are_accepted(server: dict[str, Any]) -> None:
    body = {"model": MODEL, "messages": HI, "max_tokens": 4, "temperature": 0}
    plain = post(server, "/v1/chat/completions", body).json()["choices"][0]["message"]["content"]
    extra = {"user": "u1", "store": False, "metadata": {"k": "v"}, "service_tier": "auto", "parallel_tool_calls": True,
             "stream_options": None, "n": None, "presence_penalty": None}  # fmt: skip
    r = post(server, "/v1/chat/completions", body | extra)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == plain


# ---- a real framework and gRPC -----------------------------------------------------------------


class Movie(BaseModel):
    title: str = Field(max_length=12)
    year: int = Field(ge=1900, le=2030)
    genre: str = Field(json_schema_extra={"enum": ["drama", "comedy"]})


def test_langchain_binds_tools_and_gets_structured_output(server: dict[str, Any]) -> None:
    from langchain_openai import ChatOpenAI

    chat = ChatOpenAI(model=MODEL, base_url=server["url"] + "/v1", api_key="unused",  # type: ignore[arg-type]
                      temperature=0.8, seed=0, max_completion_tokens=300, max_retries=0)  # fmt: skip
    tools = chat.bind_tools([{"type": "function", "function": WEATHER}], tool_choice="get_weather",
                            parallel_tool_calls=False)  # fmt: skip
    message = tools.invoke("What is the weather in Rome?")
    assert message.tool_calls and message.tool_calls[0]["name"] == "get_weather"  # type: ignore[attr-defined]
    jsonschema.validate(message.tool_calls[0]["args"], WEATHER["parameters"])  # type: ignore[attr-defined]
    movie = chat.with_structured_output(Movie, method="json_schema").invoke("Name a movie")
    assert isinstance(movie, Movie) and movie.genre in ("drama", "comedy")


def test_grpc_takes_the_same_controls(server: dict[str, Any]) -> None:
    stub = pb_grpc.InferenceStub(grpc.insecure_channel(server["grpc"]))
    biased = stub.Complete(pb.GenerateRequest(prompt="Hello", max_tokens=6, temperature=1.0, logit_bias={777: 100.0}))
    assert list(biased.token_ids) == [777] * 6
    shaped = stub.Complete(pb.GenerateRequest(prompt="Hello", max_tokens=200, temperature=1.0, seed=0,
                                              json_schema=json.dumps(NESTED)))  # fmt: skip
    assert shaped.finish_reason == "stop"
    jsonschema.validate(json.loads(shaped.text), NESTED)
    picked = stub.Complete(pb.GenerateRequest(prompt="Hello", max_tokens=20, choice=["left", "right"]))
    assert picked.text in ("left", "right")
    penalised = stub.Complete(pb.GenerateRequest(prompt="Hello", max_tokens=6, temperature=0, presence_penalty=-2.0,
                                                 min_tokens=6))  # fmt: skip
    assert len(penalised.token_ids) == 6
    with pytest.raises(grpc.RpcError) as e:
        stub.Complete(pb.GenerateRequest(prompt="Hello", regex="a+", choice=["a"]))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_the_readmes_client_examples_run_against_the_server(server: dict[str, Any], tmp_path: Path) -> None:
    """The README's openai, tools and gRPC examples, as written but for the server's address."""
    code = "\n".join(readme_blocks("Talking to the server"))
    assert code.count("http://127.0.0.1:8000") == 1 and code.count("127.0.0.1:9000") == 1
    code = code.replace("http://127.0.0.1:8000", server["url"]).replace("127.0.0.1:9000", server["grpc"])
    out = run_example(code, tmp_path)
    assert "function=Function(" in out and "name='get_weather'" in out, out  # the forced tool call
    answers = [json.loads(line) for line in out.splitlines() if line.startswith('{"answer"')]  # the schema's reply
    assert answers and answers[0]["answer"] in ("yes", "no"), out


# ---- lm-evaluation-harness ---------------------------------------------------------------------

LL_DOCS = [
    {"context": "The capital of France is", "choices": [" Paris", " Berlin", " a city by the sea"], "answer": 0},
    {"context": "Two plus two equals", "choices": [" four", " five"], "answer": 0},
    {"context": "Water is made of hydrogen and", "choices": [" oxygen", " gold", " light"], "answer": 0},
]
GEN_DOCS = [
    {"question": "Q: What is the colour of the sky?\nA:", "answer": " blue"},
    {"question": "Q: Name a fruit.\nA:", "answer": " apple"},
]
MAX_GEN = 8


def write_tasks(folder: Path) -> None:
    (folder / "ll.json").write_text("\n".join(json.dumps(d) for d in LL_DOCS))
    (folder / "gen.json").write_text("\n".join(json.dumps(d) for d in GEN_DOCS))
    ll = {
        "task": "mixtral_tiny_choice", "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(folder / "ll.json")}}, "test_split": "test",
        "output_type": "multiple_choice", "doc_to_text": "{{context}}", "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{answer}}", "metric_list": [{"metric": "acc"}],
    }  # fmt: skip
    gen = {
        "task": "mixtral_tiny_generate", "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(folder / "gen.json")}}, "test_split": "test",
        "output_type": "generate_until", "doc_to_text": "{{question}}", "doc_to_target": "{{answer}}",
        "generation_kwargs": {"until": ["\n"], "max_gen_toks": MAX_GEN, "do_sample": False, "temperature": 0},
        "metric_list": [{"metric": "exact_match"}],
    }  # fmt: skip
    (folder / "ll.yaml").write_text(yaml.safe_dump(ll))
    (folder / "gen.yaml").write_text(yaml.safe_dump(gen))


def test_lm_eval_local_completions_equals_transformers(server: dict[str, Any], ckpt: Path, tmp_path: Path) -> None:
    """lm-evaluation-harness, as its users run it: model `local-completions` with the server's own
    tokenizer (`/tokenize`, `/detokenize`, `/tokenizer_info`: nothing comes from a hub), on two
    small tasks whose data this test writes: a loglikelihood (multiple choice) task and a
    `generate_until` task. Its loglikelihoods must equal transformers' on the same checkpoint and
    tokens, and its generations transformers' greedy continuations."""
    lm_eval = pytest.importorskip("lm_eval")  # in the test extra; skipped only in a bare install
    from lm_eval.models.openai_completions import LocalCompletionsAPI
    from lm_eval.tasks import TaskManager

    write_tasks(tmp_path)
    lm = LocalCompletionsAPI(base_url=server["url"] + "/v1/completions", model=MODEL, tokenizer_backend="remote",
                             tokenized_requests=True, max_length=1024, num_concurrent=2)  # fmt: skip
    results = lm_eval.simple_evaluate(
        model=lm, tasks=["mixtral_tiny_choice", "mixtral_tiny_generate"],
        task_manager=TaskManager(include_path=str(tmp_path)), log_samples=True, random_seed=0,
    )  # fmt: skip
    assert results is not None
    hf = MixtralForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()

    # Loglikelihoods: each (context, choice) pair lm-eval scored, against transformers on its tokens.
    scored = results["samples"]["mixtral_tiny_choice"]
    assert len(scored) == len(LL_DOCS)
    pairs = 0
    for sample in scored:
        for (context, continuation), (ll, _greedy) in zip(
            (a["arguments"] for a in _requests(sample)), (r[0] for r in sample["resps"]), strict=True
        ):
            ctx, cont = lm._encode_pair(context, continuation)
            tokens = torch.tensor([ctx + cont])
            with torch.no_grad():
                logprobs = torch.log_softmax(hf(tokens).logits[0], -1)
            want = sum(logprobs[len(ctx) + i - 1, t].item() for i, t in enumerate(cont))
            assert ll == pytest.approx(want, abs=1e-3), (context, continuation)
            pairs += 1
    assert pairs == sum(len(d["choices"]) for d in LL_DOCS)
    assert "acc,none" in results["results"]["mixtral_tiny_choice"]

    # Generations: transformers' greedy continuation of the same tokens, cut at the stop sequence.
    tok = Tokenizer.default()
    generated = results["samples"]["mixtral_tiny_generate"]
    assert len(generated) == len(GEN_DOCS)
    for sample in generated:
        context = _requests(sample)[0]["arguments"][0]
        ids = lm.tok_encode(context)
        out = hf.generate(torch.tensor([ids]), max_new_tokens=MAX_GEN, do_sample=False, pad_token_id=0)[0, len(ids) :]
        want = tok.continuation(ids, out.tolist()).split("\n")[0]
        assert sample["resps"][0][0] == want
    assert "exact_match,none" in results["results"]["mixtral_tiny_generate"]


def _requests(sample: dict[str, Any]) -> list[dict[str, Any]]:
    """A logged sample's requests with their arguments (lm-eval logs them under "arguments")."""
    args = sample["arguments"]
    if isinstance(args, dict):  # {"gen_args_0": {"arg_0": context, "arg_1": continuation}, ...}
        return [{"arguments": [v for _, v in sorted(a.items())]} for _, a in sorted(args.items())]
    return [{"arguments": a} for a in args]
