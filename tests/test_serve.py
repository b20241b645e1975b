"""The real Serve app in local mode: OpenAI client, raw HTTP, gRPC, disconnects, two model copies."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import openai
import pytest
import ray
from ray import serve

from cluster.engine.request import SamplingParams
from cluster.llm import LLM
from cluster.proto import inference_pb2 as pb
from cluster.proto import inference_pb2_grpc as pb_grpc
from cluster.serving.config import ServeConfig
from tests.support.common import ENGINE_CONFIG
from tests.support.serving import serving

pytestmark = pytest.mark.serve

MODEL = "mixtral-tiny"
KEY = "test-key-123"
AUTH = [("authorization", f"Bearer {KEY}")]  # gRPC metadata


@pytest.fixture(scope="module")
def ckpt(checkpoint_factory) -> Path:
    return checkpoint_factory(ENGINE_CONFIG, seed=5)


@pytest.fixture(scope="module")
def server(ckpt) -> Iterator[dict]:
    with serving(ckpt, serving={"api_key": KEY, "min_replicas": 2, "max_replicas": 2, "max_body_bytes": 65536}) as s:
        yield s


@pytest.fixture(scope="module")
def http(server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server["url"], headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def reference(ckpt) -> Iterator[LLM]:
    llm = LLM(ckpt, single_process=True)
    yield llm
    llm.shutdown()


def engine_stats() -> list[dict]:
    """Stats of every LLMServer replica (one model copy each)."""
    handle = serve.get_deployment_handle("LLMServer", app_name="mixtral")
    seen: dict[str, dict] = {}
    for _ in range(40):
        s = handle.stats.remote().result()
        seen[s["replica"]] = s
        if len(seen) == 2:
            break
    return list(seen.values())


# ---- the OpenAI client ------------------------------------------------------------------------


def test_completion_equals_llm_generate(client: openai.OpenAI, reference: LLM) -> None:
    prompt = "The quick brown fox"
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
    expected = reference.generate([prompt], SamplingParams(max_tokens=12, temperature=0.0))[0]
    assert out.choices[0].text == expected.text
    assert out.choices[0].finish_reason == expected.finish_reason
    assert out.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert out.usage.completion_tokens == len(expected.token_ids)
    assert out.model == MODEL and out.object == "text_completion"


def test_streamed_completion_concatenates_to_the_same_text(client: openai.OpenAI, reference: LLM) -> None:
    stream = client.completions.create(
        model=MODEL, prompt=[1, 500, 600, 700], max_tokens=10, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    expected = reference.generate([[1, 500, 600, 700]], SamplingParams(max_tokens=10, temperature=0.0))[0]
    assert text == expected.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 10 and chunks[-1].usage.prompt_tokens == 4


def test_chat_equals_llm_generate_on_the_chat_prompt(client: openai.OpenAI, reference: LLM) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    out = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)
    prompt = reference.tokenizer.encode_chat(messages)
    expected = reference.generate([prompt], SamplingParams(max_tokens=8, temperature=0.0))[0]
    assert out.choices[0].message.content == expected.text
    assert out.choices[0].message.role == "assistant"
    assert out.usage.prompt_tokens == len(prompt)
    streamed = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0, stream=True)
    chunks = list(streamed)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected.text
    assert chunks[-1].choices[0].finish_reason == expected.finish_reason


def test_stop_and_seeded_sampling_over_http(client: openai.OpenAI) -> None:
    free = client.completions.create(model=MODEL, prompt="Once upon", max_tokens=16, temperature=0).choices[0].text
    stop = free[6:9]
    cut = client.completions.create(model=MODEL, prompt="Once upon", max_tokens=16, temperature=0, stop=[stop])
    assert cut.choices[0].finish_reason == "stop" and cut.choices[0].text == free[: free.index(stop)]
    a = client.completions.create(model=MODEL, prompt="Once upon", max_tokens=12, temperature=1.0, seed=7)
    b = client.completions.create(model=MODEL, prompt="Once upon", max_tokens=12, temperature=1.0, seed=7)
    assert a.choices[0].text == b.choices[0].text  # whichever model copy served each


def test_models_and_health(client: openai.OpenAI, server) -> None:
    assert [m.id for m in client.models.list().data] == [MODEL]
    health = httpx.get(server["url"] + "/health")  # no API key needed
    assert health.status_code == 200 and health.json()["status"] == "ok"


# ---- bad input over raw HTTP --------------------------------------------------------------------

BAD_REQUESTS = [
    ("completions", b"{not json", 400, None),
    ("completions", b"[1, 2]", 400, None),
    ("completions", {"model": "gpt-4", "prompt": "hi"}, 404, "model"),
    ("completions", {"prompt": "hi"}, 400, "model"),
    ("completions", {"model": MODEL, "prompt": ""}, 400, "prompt"),
    ("completions", {"model": MODEL, "prompt": []}, 400, "prompt"),
    ("completions", {"model": MODEL, "prompt": 5}, 400, "prompt"),
    ("completions", {"model": MODEL, "prompt": [1, 99999]}, 400, "prompt"),
    ("completions", {"model": MODEL, "prompt": "word " * 600}, 400, "prompt"),
    ("completions", {"model": MODEL, "prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("completions", {"model": MODEL, "prompt": "hi", "max_tokens": -3}, 400, "max_tokens"),
    ("completions", {"model": MODEL, "prompt": "hi", "max_tokens": 600}, 400, "max_tokens"),
    ("completions", {"model": MODEL, "prompt": "hi", "max_tokens": "ten"}, 400, "max_tokens"),
    ("completions", {"model": MODEL, "prompt": "hi", "temperature": -0.5}, 400, "temperature"),
    ("completions", {"model": MODEL, "prompt": "hi", "temperature": "hot"}, 400, "temperature"),
    ("completions", {"model": MODEL, "prompt": "hi", "top_p": 0}, 400, "top_p"),
    ("completions", {"model": MODEL, "prompt": "hi", "top_p": 1.5}, 400, "top_p"),
    ("completions", {"model": MODEL, "prompt": "hi", "stream": "yes"}, 400, "stream"),
    ("completions", {"model": MODEL, "prompt": "hi", "n": 17}, 400, "n"),
    ("completions", {"model": MODEL, "prompt": "hi", "n": 0}, 400, "n"),
    ("completions", {"model": MODEL, "prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("completions", {"model": MODEL, "prompt": "hi", "logprobs": 21}, 400, "logprobs"),
    ("completions", {"model": MODEL, "prompt": [[1, 2], []]}, 400, "prompt"),
    ("completions", {"model": MODEL, "prompt": "hi", "seed": 2**70}, 400, "seed"),
    ("chat/completions", {"model": MODEL, "messages": []}, 400, "messages"),
    ("chat/completions", {"model": MODEL, "messages": "hello"}, 400, "messages"),
    ("chat/completions", {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages.0.role"),
    ("chat/completions", {"model": MODEL, "messages": [{"role": "user"}]}, 400, "messages.0.content"),
    ("chat/completions", {"model": MODEL, "messages": [{"role": "assistant", "content": "x"}]}, 400, "messages"),
    ("chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0},
     400, "max_tokens"),
]  # fmt: skip


@pytest.mark.parametrize(("route", "body", "status", "param"), BAD_REQUESTS)
def test_bad_input_gets_a_4xx_naming_the_field(http: httpx.Client, route, body, status, param) -> None:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = http.post(f"/v1/{route}", content=content, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"] and err["type"]


def test_oversized_body_and_wrong_key(http: httpx.Client, server) -> None:
    big = json.dumps({"model": MODEL, "prompt": "x" * 100_000}).encode()
    r = http.post("/v1/completions", content=big, headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = httpx.post(server["url"] + "/v1/completions", json={"model": MODEL, "prompt": "hi"}, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(server["url"] + "/v1/models").status_code == 401
    assert httpx.get(server["url"] + "/metrics").status_code == 401


def test_server_still_serves_after_bad_input(client: openai.OpenAI) -> None:
    out = client.completions.create(model=MODEL, prompt="still here", max_tokens=4, temperature=0)
    assert out.usage.completion_tokens == 4


# ---- disconnects, replicas, metrics -------------------------------------------------------------


def test_client_dropping_a_stream_frees_its_kv_blocks(server) -> None:
    body = {"model": MODEL, "prompt": "tell me a long story", "max_tokens": 400, "temperature": 0, "stream": True}
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.stream("POST", server["url"] + "/v1/completions", json=body, headers=headers, timeout=60) as r:
        lines = r.iter_lines()
        assert next(ln for ln in lines if ln.startswith("data: "))
        assert max(s["blocks_in_use"] for s in engine_stats()) > 0  # mid-stream, connection open
        lines.close()
        r.close()  # the client leaves mid-stream
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        stats = engine_stats()
        if all(s["blocks_in_use"] == 0 and s["running"] == 0 for s in stats):
            break
        time.sleep(0.2)
    assert [s["blocks_in_use"] for s in stats] == [0, 0]


def test_two_replicas_both_answer(client: openai.OpenAI) -> None:
    import concurrent.futures

    def ask(i: int) -> str:
        out = client.completions.create(model=MODEL, prompt=f"request {i}", max_tokens=24, temperature=0)
        return str(out.system_fingerprint)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        replicas = set(pool.map(ask, range(16)))
    assert len(replicas) == 2
    assert len(engine_stats()) == 2


def test_metrics_are_prometheus_text(http: httpx.Client) -> None:
    http.post("/v1/completions", json={"model": MODEL, "prompt": "count me", "max_tokens": 3, "stream": True})
    text = http.get("/metrics").text
    for name in ("mixtral_requests_total", "mixtral_prompt_tokens_total", "mixtral_generation_tokens_total",
                 "mixtral_time_to_first_token_seconds_bucket", "mixtral_inter_token_latency_seconds_bucket",
                 "mixtral_running_sequences", "mixtral_waiting_sequences", "mixtral_kv_blocks_in_use",
                 'mixtral_expert_tokens{expert="7",layer="3"', 'mixtral_expert_group_tokens{group="1"',
                 "mixtral_expert_imbalance{", 'mixtral_expert_cost_imbalance{phase="decode"',
                 'mixtral_expert_ms_per_step{phase="prefill"'):  # fmt: skip
        assert name in text, name
    generated = [ln for ln in text.splitlines() if ln.startswith("mixtral_generation_tokens_total ")]
    assert float(generated[0].split()[-1]) >= 3


# ---- gRPC ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stub(server) -> Iterator[pb_grpc.InferenceStub]:
    with grpc.insecure_channel(server["grpc"]) as channel:
        yield pb_grpc.InferenceStub(channel)


def test_grpc_unary_and_streaming(stub, reference: LLM) -> None:
    expected = reference.generate(["Hello there"], SamplingParams(max_tokens=6, temperature=0.0))[0]
    request = pb.GenerateRequest(model=MODEL, prompt="Hello there", max_tokens=6, temperature=0)
    unary = stub.Complete(request, metadata=AUTH)
    assert unary.text == expected.text and list(unary.token_ids) == expected.token_ids
    assert unary.finish_reason == "length" and unary.usage.total_tokens == len(expected.prompt_token_ids) + 6
    parts = list(stub.Generate(request, metadata=AUTH))
    assert "".join(p.text for p in parts) == expected.text
    assert [t for p in parts for t in p.token_ids] == expected.token_ids
    assert parts[-1].finish_reason == "length" and parts[-1].usage.completion_tokens == 6
    chat_request = pb.GenerateRequest(messages=[pb.ChatMessage(role="user", content="Hi")], max_tokens=3)
    chat = stub.Complete(chat_request, metadata=AUTH)
    assert len(chat.token_ids) == 3
    assert list(stub.ListModels(pb.ListModelsRequest(), metadata=AUTH).models) == [MODEL]
    assert stub.Health(pb.HealthRequest()).healthy  # no key needed, like GET /health


def test_grpc_requires_the_api_key(stub) -> None:
    request = pb.GenerateRequest(prompt="hi", max_tokens=2)
    calls = (stub.Complete, lambda r, **kw: list(stub.Generate(r, **kw)))
    for call in calls:
        for metadata in ([], [("authorization", "Bearer wrong")]):
            with pytest.raises(grpc.RpcError) as e:
                call(request, metadata=metadata)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as e:
        stub.ListModels(pb.ListModelsRequest())
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (pb.GenerateRequest(prompt="hi", temperature=-1), "temperature"),
        (pb.GenerateRequest(prompt="hi", top_p=2), "top_p"),
        (pb.GenerateRequest(prompt="hi", max_tokens=0), "max_tokens"),
        (pb.GenerateRequest(prompt=""), "prompt"),
        (pb.GenerateRequest(prompt="hi", max_tokens=100000), "max_tokens"),
        (pb.GenerateRequest(messages=[pb.ChatMessage(role="robot", content="x")]), "messages"),
    ],
)
def test_grpc_invalid_argument(stub, request_, field: str) -> None:
    for call in (stub.Complete, lambda r, **kw: list(stub.Generate(r, **kw))):
        with pytest.raises(grpc.RpcError) as e:
            call(request_, metadata=AUTH)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in e.value.details()


# ---- security defaults ---------------------------------------------------------------------------


def test_logs_hold_no_prompt_text_or_api_key(client: openai.OpenAI, http: httpx.Client, stub) -> None:
    """At the default level nothing writes request contents or keys to the cluster's log files."""
    marker = f"zebra quartz {uuid.uuid4().hex[:10]}"
    client.completions.create(model=MODEL, prompt=marker, max_tokens=2)
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": marker}], max_tokens=2)
    http.post("/v1/completions", json={"model": MODEL, "prompt": marker, "temperature": -1})  # refused
    stub.Complete(pb.GenerateRequest(prompt=marker, max_tokens=2), metadata=AUTH)
    with pytest.raises(grpc.RpcError):
        list(stub.Generate(pb.GenerateRequest(prompt=marker, top_p=5), metadata=AUTH))
    time.sleep(2)  # let the workers flush their log files
    logs = Path(ray._private.worker.global_worker.node.get_logs_dir_path())
    files = [f for f in logs.rglob("*") if f.is_file()]
    assert files
    for f in files:
        data = f.read_bytes()
        assert marker.encode() not in data, f"prompt text in {f.name}"
        assert KEY.encode() not in data, f"API key in {f.name}"


def test_security_defaults_in_config() -> None:
    assert ServeConfig.model_validate({"model": {"checkpoint": "x"}}).serving.host == "127.0.0.1"
    assert ServeConfig.load("tiny.yaml").serving.host == "127.0.0.1"
    assert ServeConfig.model_validate({"model": {"checkpoint": "x"}}).serving.api_key is None  # opt-in
