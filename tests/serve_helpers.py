"""Helpers for tests that run the Serve app under load and break it: steady traffic, the census of
actors and placement groups, and waiting until the copy answers correctly again."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import grpc
import httpx
import ray
from ray._private import state as ray_state

from cluster.proto import inference_pb2 as pb
from cluster.proto import inference_pb2_grpc as pb_grpc

MODEL = "mixtral-tiny"
PROMPT = "The first law of robotics"


def census() -> tuple[int, int]:
    """Alive actors and placement groups that are not removed."""
    actors = sum(a["State"] == "ALIVE" for a in ray_state.actors().values())
    groups = sum(g["state"] != "REMOVED" for g in ray.util.placement_group_table().values())
    return actors, groups


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
    """Clients sending long requests back to back (non-streamed, streamed and gRPC streams) until stopped."""

    def __init__(self, url: str, grpc_target: str | None = None) -> None:
        self.url, self.grpc_target = url, grpc_target
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

    def _record(self, kind: str, start: float, outcome: str, detail: Any = None) -> None:
        with self.lock:
            self.records.append({"kind": kind, "start": start, "end": time.monotonic(), "outcome": outcome,
                                 "detail": detail})  # fmt: skip

    def _body(self, stream: bool) -> dict[str, Any]:
        return {"model": MODEL, "prompt": "tell me everything", "max_tokens": 300, "temperature": 0, "stream": stream}

    def _plain(self) -> None:
        while not self.stop.is_set():
            start = time.monotonic()
            try:
                r = httpx.post(self.url + "/v1/completions", json=self._body(False), timeout=60)
                self._record("plain", start, str(r.status_code), (dict(r.headers), r.json()))
            except httpx.HTTPError as e:
                self._record("plain", start, "transport", repr(e))

    def _stream(self) -> None:
        while not self.stop.is_set():
            start = time.monotonic()
            try:
                with httpx.stream("POST", self.url + "/v1/completions", json=self._body(True), timeout=60) as r:
                    last = None
                    for line in r.iter_lines():
                        if line.startswith("data: ") and line != "data: [DONE]":
                            last = json.loads(line[6:])
                    outcome = "error-event" if last and "error" in last else str(r.status_code)
                    self._record("stream", start, outcome, last)
            except httpx.HTTPError as e:
                self._record("stream", start, "transport", repr(e))

    def _grpc(self) -> None:
        assert self.grpc_target is not None
        with grpc.insecure_channel(self.grpc_target) as channel:
            stub = pb_grpc.InferenceStub(channel)
            while not self.stop.is_set():
                start = time.monotonic()
                try:
                    list(stub.Generate(pb.GenerateRequest(prompt="tell me everything", max_tokens=300, temperature=0)))
                    self._record("grpc", start, "OK")
                except grpc.RpcError as e:
                    self._record("grpc", start, e.code().name, e.details())
