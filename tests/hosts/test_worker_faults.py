"""Worker faults under load, through the real Serve app: each role's process is killed (SIGKILL)
while requests stream (plain, streamed and gRPC clients). The copy replaces that worker alone (a
new actor in its bundle, the data plane formed anew) while the others keep their weights and KV
caches: no request fails, every answer equals a fault-free copy's, and clients see a stall, not an
error. A lost attention shard's sequences are recomputed, and a constrained request in flight
still ends in valid JSON (its grammar state lives in the engine). If the replacement cannot start,
the copy falls back to failing its requests with 503, and Serve replaces the whole copy."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
from ray import serve

from cluster.engine.request import SamplingParams
from cluster.llm import LLM
from cluster.serving.streams import HEALTH_TIMEOUT_S
from tests.support.common import ENGINE_CONFIG
from tests.support.serving import MODEL, PROMPT, Load, census, census_back, serving, wait_until_serving

pytestmark = pytest.mark.serve

logger = logging.getLogger(__name__)
# A long constrained answer (~150 tokens), so that it is still decoding when the worker dies.
LONG_JSON = {"type": "array", "minItems": 30, "maxItems": 30, "items": {"enum": ["alpha", "beta", "gamma"]}}


@pytest.fixture(scope="module")
def ckpt(checkpoint_factory: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private copy: one test hides its weights."""
    return Path(shutil.copytree(checkpoint_factory(ENGINE_CONFIG, seed=5), tmp_path_factory.mktemp("faults") / "ck"))


@pytest.fixture(scope="module")
def server(ckpt: Path) -> Iterator[dict[str, str]]:
    with serving(ckpt, serving={"health_check_period_s": 1, "retry_after_s": 3}) as s:
        yield s


@pytest.fixture(scope="module")
def expected(ckpt: Path) -> dict[str, str]:
    """The fault-free answers: the probe's and the load's."""
    with LLM(ckpt, single_process=True) as llm:
        probe = llm.generate([PROMPT], SamplingParams(max_tokens=8, temperature=0.0))[0].text
        load = llm.generate([Load.PROMPT], SamplingParams(max_tokens=Load.MAX_TOKENS, temperature=0.0))[0].text
    return {"probe": probe, "load": load}


def workers() -> list[dict[str, Any]]:
    return serve.get_deployment_handle("LLMServer", app_name="mixtral").workers.remote().result()


def recoveries() -> list[dict[str, Any]]:
    return serve.get_deployment_handle("LLMServer", app_name="mixtral").stats.remote().result()["recoveries"]


@pytest.mark.parametrize("role", ["experts", "router", "attention"])
def test_a_killed_worker_is_replaced_and_no_request_fails(server: dict[str, str], expected: dict[str, str],
                                                          role: str) -> None:  # fmt: skip
    url = server["url"]
    wait_until_serving(url, expected["probe"])
    before = census()
    done_before = len(recoveries())
    victim = next(w for w in workers() if w["name"].startswith(role))
    constrained: list[httpx.Response] = []
    body = {"model": MODEL, "messages": [{"role": "user", "content": "List"}], "max_tokens": 400, "temperature": 1.0,
            "response_format": {"type": "json_schema", "json_schema": {"name": "l", "schema": LONG_JSON}}}  # fmt: skip
    asking = threading.Thread(target=lambda: constrained.append(httpx.post(url + "/v1/chat/completions", json=body,
                                                                           timeout=120)))  # fmt: skip
    with Load(url, server["grpc"]) as load:
        time.sleep(1.5)
        asking.start()
        time.sleep(0.5)  # requests are decoding
        killed = time.monotonic()
        os.kill(victim["pid"], signal.SIGKILL)
        time.sleep(8.0)  # and go on through the replacement
    asking.join(timeout=120)
    (reply,) = constrained
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["finish_reason"] == "stop"
    jsonschema.validate(json.loads(reply.json()["choices"][0]["message"]["content"]), LONG_JSON)
    in_flight = load.in_flight(killed)
    assert len({r["kind"] for r in in_flight}) >= 2, in_flight  # requests of several kinds were decoding
    failures = load.failures()
    assert not failures, failures[:3]
    wrong = [r for r in load.records if r["text"] != expected["load"]]
    assert not wrong, [(r["kind"], r["text"][:40]) for r in wrong[:3]]  # every answer whole and unchanged
    replaced = next(w for w in workers() if w["name"] == victim["name"])
    assert replaced["pid"] != victim["pid"]
    (recovery,) = recoveries()[done_before:]
    assert census() == before, "actors or placement groups leaked"
    logger.info("%s killed: %d requests in flight, 0 failed; longest stall of a stream %.2f s; worker replaced "
                "in %.1f s", role, len(in_flight), load.stall(killed), recovery["seconds"])  # fmt: skip


def test_a_worker_that_cannot_be_replaced_fails_the_copy_which_serve_replaces(
    server: dict[str, str], expected: dict[str, str], ckpt: Path
) -> None:
    url = server["url"]
    wait_until_serving(url, expected["probe"])
    before = census()
    victim = next(w for w in workers() if w["name"].startswith("experts"))
    weights = ckpt / "model.safetensors"
    hidden = weights.rename(ckpt / "model.safetensors.hidden")  # its replacement finds no weights
    try:
        with Load(url, server["grpc"]) as load:
            time.sleep(2.0)
            killed = time.monotonic()
            os.kill(victim["pid"], signal.SIGKILL)
            health = []
            while time.monotonic() - killed < 8.0:
                health.append(httpx.get(url + "/health", timeout=HEALTH_TIMEOUT_S + 3).status_code)
                time.sleep(0.2)
            hidden.rename(weights)  # back, for Serve's new copy: the requests queued meanwhile are served
        in_flight = load.in_flight(killed)
        assert in_flight
        for r in in_flight:
            assert r["end"] - killed < 10.0, r  # ended within the replacement attempt, never hung
            if r["kind"] == "plain":
                headers, body = r["detail"]
                assert r["outcome"] == "503" and headers["retry-after"] == "3", r
                assert body["error"]["type"] == "service_unavailable", r
            elif r["kind"] == "stream":
                assert r["outcome"] == "error-event" and r["detail"]["error"]["type"] == "service_unavailable", r
            else:
                assert r["outcome"] == "UNAVAILABLE", r
        assert 503 in health, health
    finally:
        if not weights.exists():
            hidden.rename(weights)
    recovered = wait_until_serving(url, expected["probe"], timeout_s=180)  # Serve's new copy
    assert census_back(before) == before, "actors or placement groups leaked"
    logger.info("the replacement could not load its weights: in-flight requests got 503; a new copy served "
                "%.1f s after the weights were back", recovered)  # fmt: skip
