"""Helpers for tests that run the Serve app under load and break it: steady traffic, the census of
actors and placement groups, and waiting until the copy answers correctly again."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import httpx
import ray
from ray import serve
from ray._private import state as ray_state
from ray.serve.config import HTTPOptions, gRPCOptions

from cluster.proto import inference_pb2 as pb
from cluster.proto import inference_pb2_grpc as pb_grpc
from cluster.serving.app import build_app
from cluster.serving.config import ServeConfig
from tests.support.common import local_ray

MODEL = "mixtral-tiny"
PROMPT = "The first law of robotics"
GRPC_SERVICER = "cluster.proto.inference_pb2_grpc.add_InferenceServicer_to_server"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def serving(
    checkpoint: Path, engine: dict[str, Any] | None = None, **sections: dict[str, Any]
) -> Iterator[dict[str, Any]]:
    """The real Serve app (HTTP + gRPC on free local ports) for a tiny copy with A=1 R=1 G=2.

    `engine` and the other config sections update the defaults below. Starts a local Ray unless
    one is already connected (a simulated cluster, a host cluster), and stops Serve after."""
    http_port, grpc_port = free_port(), free_port()
    cfg = ServeConfig.model_validate({
        "model": {"checkpoint": str(checkpoint), "name": MODEL} | sections.get("model", {}),
        "cluster": {"attention_shards": 1, "routers": 1, "expert_groups": 2} | sections.get("cluster", {}),
        "engine": {"block_size": 4, "kv_cache_gb": 0.01, "max_model_len": 512, "max_seqs": 64} | (engine or {}),
        "serving": {"http_port": http_port, "grpc_port": grpc_port} | sections.get("serving", {}),
    })  # fmt: skip
    local_ray()  # unless one is connected
    serve.start(
        proxy_location="HeadOnly",  # as the Serve configs: clients reach the head
        http_options=HTTPOptions(host="127.0.0.1", port=http_port),
        grpc_options=gRPCOptions(port=grpc_port, grpc_servicer_functions=[GRPC_SERVICER]),
    )
    serve.run(build_app(cfg), name="mixtral", route_prefix="/")
    try:
        yield {"url": f"http://127.0.0.1:{http_port}", "grpc": f"127.0.0.1:{grpc_port}", "config": cfg}
    finally:
        serve.shutdown()  # type: ignore[no-untyped-call]


def census() -> tuple[int, int]:
    """Alive actors and placement groups that are not removed."""
    actors = sum(a["State"] == "ALIVE" for a in ray_state.actors().values())
    groups = sum(g["state"] != "REMOVED" for g in ray.util.placement_group_table().values())
    return actors, groups


def census_back(before: tuple[int, int], timeout_s: float = 60) -> tuple[int, int]:
    """The census once it is `before` again (a replaced copy's actors and groups are reaped a moment
    after it serves), or as it stands at the deadline: a leak stays, and shows."""
    deadline = time.monotonic() + timeout_s
    while (now := census()) != before and time.monotonic() < deadline:
        time.sleep(0.25)
    return now


def answer(url: str) -> httpx.Response:
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 8, "temperature": 0}
    return httpx.post(url + "/v1/completions", json=body, timeout=30)


def wait_until_serving(url: str, expected: str, timeout_s: float = 120) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        try:
            r = answer(url)
            if r.status_code == 200:
                assert r.json()["choices"][0]["text"] == expected  # correct again, not merely up
                return time.monotonic() - start
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"not serving again within {timeout_s} s")


class Load:
    """Clients sending long greedy requests back to back (non-streamed, streamed and gRPC streams)
    until stopped. Each record: kind, start, end, outcome, the text received, and for streams the
    times its pieces arrived."""

    PROMPT = "tell me everything"
    # ~6 s a request with the three clients on the tiny copy (on 2 cores): each client always has one
    # in flight (they send back to back), so a break a second or two in meets a request of each kind,
    # which then stalls through the recovery and goes on. Longer buys nothing and costs at every exit,
    # which waits for each client's request to end (300 tokens: ~12 s a time, measured).
    MAX_TOKENS = 96

    def __init__(self, url: str, grpc_target: str | None = None, timeout_s: float = 60) -> None:
        self.url, self.grpc_target, self.timeout_s = url, grpc_target, timeout_s
        self.records: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        clients = (self._plain, self._stream) + ((self._grpc,) if grpc_target else ())
        self.threads = [threading.Thread(target=fn, daemon=True) for fn in clients]

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=60)

    def _record(self, kind: str, start: float, outcome: str, detail: Any = None, text: str = "",
                arrivals: list[float] | None = None) -> None:  # fmt: skip
        with self.lock:
            self.records.append({"kind": kind, "start": start, "end": time.monotonic(), "outcome": outcome,
                                 "detail": detail, "text": text, "arrivals": arrivals or []})  # fmt: skip

    def _body(self, stream: bool) -> dict[str, Any]:
        return {
            "model": MODEL,
            "prompt": self.PROMPT,
            "max_tokens": self.MAX_TOKENS,
            "temperature": 0,
            "stream": stream,
        }

    def _plain(self) -> None:
        while not self.stop.is_set():
            start = time.monotonic()
            try:
                r = httpx.post(self.url + "/v1/completions", json=self._body(False), timeout=self.timeout_s)
                body = r.json()
                text = body["choices"][0]["text"] if r.status_code == 200 else ""
                self._record("plain", start, str(r.status_code), (dict(r.headers), body), text)
            except httpx.HTTPError as e:
                self._record("plain", start, "transport", repr(e))

    def _stream(self) -> None:
        while not self.stop.is_set():
            start = time.monotonic()
            text, arrivals, last = "", [], None
            try:
                body = self._body(True)
                with httpx.stream("POST", self.url + "/v1/completions", json=body, timeout=self.timeout_s) as r:
                    for line in r.iter_lines():
                        if line.startswith("data: ") and line != "data: [DONE]":
                            last = json.loads(line[6:])
                            if last.get("choices"):
                                text += last["choices"][0]["text"]
                                arrivals.append(time.monotonic())
                    outcome = "error-event" if last and "error" in last else str(r.status_code)
                    self._record("stream", start, outcome, last, text, arrivals)
            except httpx.HTTPError as e:
                self._record("stream", start, "transport", repr(e), text, arrivals)

    def _grpc(self) -> None:
        assert self.grpc_target is not None
        with grpc.insecure_channel(self.grpc_target) as channel:
            stub = pb_grpc.InferenceStub(channel)
            while not self.stop.is_set():
                start = time.monotonic()
                text, arrivals = "", []
                try:
                    request = pb.GenerateRequest(prompt=self.PROMPT, max_tokens=self.MAX_TOKENS, temperature=0)
                    for part in stub.Generate(request):
                        text += part.text
                        arrivals.append(time.monotonic())
                    self._record("grpc", start, "OK", None, text, arrivals)
                except grpc.RpcError as e:
                    self._record("grpc", start, e.code().name, e.details(), text, arrivals)

    def wait_ended(self, at: float, timeout_s: float) -> None:
        """Wait until each client's request in flight at `at` has ended (however it ended)."""
        kinds = {"plain", "stream"} | ({"grpc"} if self.grpc_target else set())
        deadline = time.monotonic() + timeout_s
        while True:
            with self.lock:
                ended = {r["kind"] for r in self.records if r["end"] >= at}
            if ended >= kinds:
                return
            assert time.monotonic() < deadline, f"requests in flight {timeout_s:.0f} s after the break: {kinds - ended}"
            time.sleep(0.2)

    def failures(self) -> list[str]:
        """Each request that did not succeed, as kind, outcome and the error the server gave."""
        out = []
        for r in self.records:
            if r["outcome"] in ("200", "OK"):
                continue
            detail = r["detail"]
            if r["kind"] == "plain" and isinstance(detail, tuple):  # (headers, body)
                detail = detail[1].get("error", detail[1]) if isinstance(detail[1], dict) else detail[1]
            elif isinstance(detail, dict):  # a stream's last event
                detail = detail.get("error", detail)
            out.append(f"{r['kind']} {r['outcome']} after {r['end'] - r['start']:.1f} s: {detail}")
        return out

    def in_flight(self, at: float) -> list[dict[str, Any]]:
        """The requests that had started before `at` and ended after it."""
        return [r for r in self.records if r["start"] < at <= r["end"]]

    def stall(self, at: float) -> float:
        """The longest gap between two pieces of a stream that was open at `at`: what a client waited."""
        gaps = [b - a for r in self.in_flight(at) for a, b in zip(r["arrivals"], r["arrivals"][1:], strict=False)]
        return max(gaps, default=0.0)
