"""Property-based fuzzing of the HTTP API and the gRPC service (hypothesis): thousands of generated
requests, from random bytes to nearly valid OpenAI bodies, must never get a 5xx (gRPC: never
INTERNAL or UNKNOWN), every refusal must carry an error body, and the server must stay up.

Each example of the OpenAI and gRPC fuzzing is a batch of 16 requests sent at once, as many
clients send them: bad bodies arrive among good ones, and the server's processes (proxy, ingress,
model copy) work side by side instead of waiting on one request at a time. The module takes 47 s of
fuzzing instead of 82 (one at a time), with more of the bodies generating. A failing batch shrinks
as any example does, its other bodies to the simplest ones."""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import grpc
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cluster.proto import inference_pb2 as pb
from cluster.proto import inference_pb2_grpc as pb_grpc
from tests.support.common import ENGINE_CONFIG
from tests.support.serving import serving

pytestmark = pytest.mark.serve

MODEL = "mixtral-tiny"
BATCH = 16  # requests sent at once per example
T = TypeVar("T")


def fuzzing(requests: int) -> settings:
    """Hypothesis's settings for `requests` requests sent in batches of BATCH, the same every run."""
    return settings(max_examples=-(-requests // BATCH), deadline=None, suppress_health_check=list(HealthCheck),
                    derandomize=True)  # fmt: skip


@pytest.fixture(scope="module")
def server(checkpoint_factory) -> Iterator[dict[str, str]]:
    engine = {"max_model_len": 48}  # long asks are refused fast
    with serving(checkpoint_factory(ENGINE_CONFIG, seed=5), engine, serving={"max_body_bytes": 4096}) as s:
        yield s


@pytest.fixture(scope="module")
def http(server: dict[str, str]) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server["url"], timeout=60) as client:
        yield client


# ---- strategies --------------------------------------------------------------------------------

json_scalar = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20),
)  # fmt: skip
json_value = st.recursive(json_scalar, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
    st.text(max_size=8), inner, max_size=4), max_leaves=10)  # fmt: skip
small_int = st.integers(min_value=-3, max_value=40)
token_ids = st.lists(st.integers(min_value=-5, max_value=40000), max_size=12)


def mostly(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Valid values three times in four, any JSON otherwise: deep paths get exercised too.
    (Not `one_of(valid, valid, valid, json_value)`: hypothesis merges equal branches, which made
    it one in two, and how many of the 1000 bodies got past validation drifted from run to run.)"""
    return st.sampled_from([True, True, True, False]).flatmap(lambda ok: valid if ok else json_value)


message = st.fixed_dictionaries(
    {"role": mostly(st.sampled_from(["system", "user", "assistant", "tool", "", "USER"])),
     "content": mostly(st.text(max_size=30))},
    optional={"name": st.one_of(st.none(), st.none(), st.none(), json_scalar)},  # a 400 on user messages
)  # fmt: skip
conversation = st.lists(message, max_size=3).map(lambda ms: [*ms, {"role": "user", "content": "hi"}])
FIELDS = {
    "max_tokens": mostly(st.integers(min_value=1, max_value=6) | small_int),
    "temperature": mostly(st.floats(min_value=0, max_value=2) | st.floats(min_value=-1, max_value=3)),
    "top_p": mostly(st.floats(min_value=0.01, max_value=1) | st.floats(min_value=-0.5, max_value=1.5)),
    "top_k": mostly(small_int),
    "seed": mostly(st.integers(min_value=0, max_value=2**31) | st.integers(min_value=-(2**70), max_value=2**70)),
    "stop": mostly(st.lists(st.text(min_size=1, max_size=4), max_size=4) | st.lists(st.text(max_size=4), max_size=6)),
    "stream": mostly(st.booleans()),
    "stream_options": mostly(st.fixed_dictionaries({"include_usage": st.booleans()})),
    "logprobs": mostly(st.booleans() | small_int),
    "n": mostly(st.just(1) | small_int),
}
completion = st.fixed_dictionaries(
    {"model": mostly(st.just(MODEL)), "max_tokens": mostly(st.integers(min_value=1, max_value=6)),
     "prompt": mostly(st.text(min_size=1, max_size=40) | token_ids)},
    optional={k: v for k, v in FIELDS.items() if k != "max_tokens"},
)  # fmt: skip
chat = st.fixed_dictionaries(
    {"model": mostly(st.just(MODEL)), "max_tokens": mostly(st.integers(min_value=1, max_value=6)),
     "messages": mostly(conversation | st.lists(message, max_size=4))},
    optional={k: v for k, v in FIELDS.items() if k != "max_tokens"},
)  # fmt: skip


def batches(one: st.SearchStrategy[T]) -> st.SearchStrategy[list[T]]:
    return st.lists(one, min_size=BATCH, max_size=BATCH)


def at_once(send: Callable[[T], Any], batch: Sequence[T]) -> list[Any]:
    """`send` each of `batch` from its own thread, all at once; the results in order."""
    with ThreadPoolExecutor(len(batch)) as pool:
        return list(pool.map(send, batch))


def body_bytes(obj: Any) -> bytes:
    return json.dumps(obj, allow_nan=True).encode()


def check(r: httpx.Response, seen: Counter[int]) -> None:
    seen[r.status_code] += 1
    assert r.status_code < 500, (r.status_code, r.text[:500])
    if r.status_code >= 400:
        err = r.json()["error"]
        assert err["message"] and err["type"]


def exercised(seen: Counter[int]) -> None:
    """Both the generation and the refusal paths were reached, not only one of them."""
    logging.getLogger(__name__).info("HTTP statuses over the fuzzing: %s", dict(seen))
    assert seen[200] >= 25 and seen[400] >= 250, seen


def post(http: httpx.Client, route: str, content: bytes, stream: bool) -> httpx.Response:
    if not stream:
        return http.post(route, content=content, headers={"Content-Type": "application/json"})
    with http.stream("POST", route, content=content, headers={"Content-Type": "application/json"}) as r:
        r.read()  # a stream that started must also end cleanly
        return r


# ---- HTTP ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("route", "bodies"), [("/v1/completions", completion), ("/v1/chat/completions", chat)])
def test_fuzz_openai_route(http: httpx.Client, route: str, bodies: st.SearchStrategy[dict[str, Any]]) -> None:
    seen: Counter[int] = Counter()

    @fuzzing(1000)
    @given(batch=batches(bodies))
    def one(batch: list[dict[str, Any]]) -> None:
        for r in at_once(lambda body: post(http, route, body_bytes(body), body.get("stream") is True), batch):
            check(r, seen)

    one()
    exercised(seen)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(raw=st.binary(max_size=300) | json_value.map(body_bytes), route=st.sampled_from(
    ["/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics", "/v1/nothing"]))  # fmt: skip
def test_fuzz_raw_bodies_on_every_route(http: httpx.Client, raw: bytes, route: str) -> None:
    r = http.post(route, content=raw, headers={"Content-Type": "application/json"})
    assert r.status_code < 500, (r.status_code, r.text[:300])


# ---- gRPC ----------------------------------------------------------------------------------------

int32 = st.integers(min_value=-(2**31), max_value=2**31 - 1)
grpc_message = st.builds(
    pb.ChatMessage, role=st.sampled_from(["user", "system", "assistant", "bot", ""]), content=st.text(max_size=20)
)
grpc_request = st.builds(
    pb.GenerateRequest,
    model=st.just(MODEL) | st.text(max_size=10),
    prompt=st.text(max_size=30),
    prompt_token_ids=st.lists(int32, max_size=8),
    messages=st.lists(grpc_message, max_size=3),
    max_tokens=st.none() | int32,
    temperature=st.none() | st.floats(width=32),
    top_p=st.none() | st.floats(width=32),
    top_k=st.none() | int32,
    seed=st.none() | st.integers(min_value=-(2**63), max_value=2**63 - 1),
    stop=st.lists(st.text(max_size=3), max_size=5),
)


@pytest.fixture(scope="module")
def stub(server: dict[str, str]) -> Iterator[pb_grpc.InferenceStub]:
    with grpc.insecure_channel(server["grpc"]) as channel:
        yield pb_grpc.InferenceStub(channel)


@fuzzing(500)
@given(batch=batches(st.tuples(grpc_request, st.booleans())))
def test_fuzz_grpc_fields(stub: pb_grpc.InferenceStub, batch: list[tuple[Any, bool]]) -> None:
    def call(one: tuple[Any, bool]) -> tuple[grpc.StatusCode, str]:
        request, streaming = one
        try:
            if streaming:
                list(stub.Generate(request, timeout=60))
            else:
                stub.Complete(request, timeout=60)
        except grpc.RpcError as e:
            return e.code(), e.details()
        return grpc.StatusCode.OK, ""

    answered = (grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND)
    assert [r for r in at_once(call, batch) if r[0] not in answered] == []


def test_server_is_alive_after_the_fuzzing(http: httpx.Client, stub: pb_grpc.InferenceStub) -> None:
    assert http.get("/health").json()["status"] == "ok"
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": "still fine", "max_tokens": 3})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    assert stub.Health(pb.HealthRequest()).healthy
