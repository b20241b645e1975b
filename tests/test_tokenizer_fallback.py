"""A checkpoint without its own tokenizer gets the shipped one of its vocabulary size (32000: v1,
as Mixtral 8x7B; 32768: v3). With no match, token-id prompts still run and text or chat prompts
are refused with a message that names the missing file: in one process, on the cluster, and
through the Serve app over HTTP and gRPC."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import httpx
import pytest
from mistral_common.protocol.instruct.messages import UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from cluster.engine.request import RequestError, SamplingParams
from cluster.llm import LLM
from cluster.proto import inference_pb2 as pb
from cluster.proto import inference_pb2_grpc as pb_grpc
from model.tokenizer import SHIPPED_BY_VOCAB
from tests.support.common import grid_config, reference_greedy
from tests.support.serving import MODEL, serving

pytestmark = pytest.mark.serve

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
V1 = grid_config(vocab_size=32000)  # Mixtral 8x7B's vocabulary
NONE = grid_config(vocab_size=512)  # matches no shipped tokenizer


def test_a_32000_vocabulary_speaks_v1(checkpoint_factory: Any) -> None:
    with LLM(checkpoint_factory(V1), single_process=True) as llm:
        assert llm.tokenizer is not None and (llm.tokenizer.vocab_size, llm.tokenizer.version) == (32000, "v1")
        out = llm.generate(["The capital of France is"], GREEDY)[0]
        assert out.prompt_token_ids == llm.tokenizer.encode("The capital of France is")
        assert out.text == llm.tokenizer.continuation(out.prompt_token_ids, out.token_ids)
        chat = llm.encode_chat([{"role": "user", "content": "Hi!"}])
        reference = MistralTokenizer.from_file(str(SHIPPED_BY_VOCAB[32000]))
        request = ChatCompletionRequest(messages=[UserMessage(content="Hi!")])
        assert chat == reference.encode_chat_completion(request).tokens  # the v1 chat format
        assert len(llm.generate([chat], GREEDY)[0].token_ids) == 6


def test_no_matching_tokenizer_takes_token_ids_and_names_what_is_missing(checkpoint_factory: Any) -> None:
    path = checkpoint_factory(NONE)
    with LLM(path, single_process=True) as llm:
        assert llm.tokenizer is None
        out = llm.generate([[1, 40, 41, 42]], GREEDY)[0]
        assert out.token_ids == reference_greedy(path, [[1, 40, 41, 42]], 6)[0] and out.text == ""
        for call, param in ((lambda: llm.encode("hello"), "prompt"),
                            (lambda: llm.encode_chat([{"role": "user", "content": "hi"}]), "messages")):  # fmt: skip
            with pytest.raises(RequestError, match=r"no tokenizer.*tokenizer\.model.*send token ids") as e:
                call()
            assert e.value.param == param
        with pytest.raises(RequestError, match="stop strings need a tokenizer") as e:
            llm.generate([[1, 40]], SamplingParams(stop=["x"]))
        assert e.value.param == "stop"


@pytest.fixture(scope="module")
def server(checkpoint_factory: Any) -> Iterator[dict[str, Any]]:
    with serving(checkpoint_factory(NONE)) as s:  # the cluster layout A=1 R=1 G=2
        yield s


@pytest.mark.parametrize(
    ("route", "body", "param"),
    [("completions", {"prompt": "hello"}, "prompt"), ("chat/completions", {"messages": [{"role": "user",
      "content": "hi"}]}, "messages")],
)  # fmt: skip
def test_serve_refuses_text_and_chat_naming_the_file(
    server: dict[str, Any], route: str, body: dict, param: str
) -> None:
    r = httpx.post(f"{server['url']}/v1/{route}", json={"model": MODEL, **body}, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and "tokenizer.model" in err["message"]


def test_serve_answers_token_ids(server: dict[str, Any], checkpoint_factory: Any) -> None:
    body = {"model": MODEL, "prompt": [1, 40, 41, 42], "max_tokens": 6, "temperature": 0}
    r = httpx.post(server["url"] + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 6
    with grpc.insecure_channel(server["grpc"]) as channel:
        reply = pb_grpc.InferenceStub(channel).Complete(
            pb.GenerateRequest(prompt_token_ids=[1, 40, 41, 42], max_tokens=6, temperature=0)
        )
    assert list(reply.token_ids) == reference_greedy(checkpoint_factory(NONE), [[1, 40, 41, 42]], 6)[0]
    with grpc.insecure_channel(server["grpc"]) as channel, pytest.raises(grpc.RpcError) as e:
        pb_grpc.InferenceStub(channel).Complete(pb.GenerateRequest(prompt="hello", max_tokens=2))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "tokenizer.model" in (e.value.details() or "")


def test_admin_routes_are_refused_without_an_api_key(server: dict[str, Any]) -> None:
    r = httpx.post(server["url"] + "/admin/rebalance", timeout=30)
    assert r.status_code == 403 and r.json()["error"]["code"] == "admin_disabled"
