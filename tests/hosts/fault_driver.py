"""A driver run on the head of a test-host cluster (`python -m tests.hosts.fault_driver ...`): serves a copy
whose workers live on the model hosts, runs streamed, plain and gRPC load against it, breaks the
host of `experts-0` while requests decode, and prints one JSON line: per scenario (several run one
after another on the same app), what the clients saw, where the workers are afterwards, and the
recovery.

Scenarios:
- `crash`: every process of the host killed at once; the copy replaces the lost workers on the
  slots left on the other hosts.
- `crash-no-room`: the same with no slot left elsewhere: in-flight requests end 503; then, once Ray
  has called the host dead, it comes back (its `ray start` run again, as its supervisor would) and
  a new copy serves.
- `partition`: the host's link down for `--partition-s`, then up; the copy notices by its data
  plane's deadline, gives up, and a new copy serves once the host is reachable again.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import ray
from ray import serve

from cluster.backend.ray_connect import connect_ray
from cluster.engine.request import SamplingParams
from cluster.llm import LLM
from tests.hosts.namespaces import kill_namespace, namespace_pids
from tests.support.serving import PROMPT, Load, census, census_back, serving, wait_until_serving

RAYLET_EXIT_S = 90.0  # how long a raylet Ray has called dead may take to hear so and exit
SCENARIOS = ("crash", "crash-no-room", "partition")
ENDED_503 = {"plain": "503", "stream": "error-event", "grpc": "UNAVAILABLE"}  # how each client sees a 503


def _raylets(namespace: str) -> list[int]:
    found = []
    for pid in namespace_pids(namespace):
        try:
            if b"raylet/raylet" in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(pid)
        except OSError:
            pass
    return found


def _node_id(ip: str) -> str:
    return next(n["NodeID"] for n in ray.nodes() if n["Alive"] and n["NodeManagerAddress"] == ip)


def rejoined(node_id: str, host: dict[str, Any], watch_s: float = 25.0) -> bool:
    """After its link is back: whether the host's node went on by itself (True), or Ray had called it
    dead (a verdict that may land a little after the link is back: checks sent during the partition
    time out late), so that its raylet exits on hearing so and the host's supervisor (systemd on a
    real machine; here this driver) starts Ray on it again (False)."""
    deadline, dead_since = time.monotonic() + watch_s, None
    while True:
        if not _raylets(host["namespace"]):
            back = subprocess.run(host["restart"], capture_output=True, text=True)
            assert back.returncode == 0, back.stderr[-2000:]
            return False
        alive = next(n for n in ray.nodes() if n["NodeID"] == node_id)["Alive"]
        if time.monotonic() >= deadline and alive:
            return True
        dead_since = None if alive else dead_since or time.monotonic()
        # Called dead: its raylet exits once it hears so, which a loaded machine may take a while to do.
        assert dead_since is None or time.monotonic() - dead_since < RAYLET_EXIT_S, "neither rejoined nor exited"
        time.sleep(0.5)


def _message(r: dict[str, Any]) -> str:
    """The error message a client was given, where it has one."""
    detail = r["detail"]
    body = detail[1] if r["kind"] == "plain" and isinstance(detail, tuple | list) else detail
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return str(body["error"].get("message", ""))[:300]
    return str(body)[:300] if r["kind"] == "grpc" else ""


def _outcome(r: dict[str, Any]) -> str:
    """'ok', '503' (with Retry-After where the client can see headers), or what else the client saw."""
    if r["outcome"] in ("200", "OK"):
        return "ok"
    if r["outcome"] not in (ENDED_503[r["kind"]], "503"):  # a stream refused before it began: HTTP 503
        return f"{r['kind']}:{r['outcome']}"
    if r["kind"] == "plain" and r["detail"][0].get("retry-after") is None:
        return "503 without Retry-After"
    return "503"


def _dead(node_id: str, timeout_s: float = 60.0) -> None:
    """Wait until Ray has called the node dead (as it does a crashed host's within seconds)."""
    deadline = time.monotonic() + timeout_s
    while next(n for n in ray.nodes() if n["NodeID"] == node_id)["Alive"]:
        assert time.monotonic() < deadline, f"Ray has not called node {node_id} dead in {timeout_s:.0f} s"
        time.sleep(0.5)


def run_scenario(scenario: str, s: dict[str, Any], hosts: dict[str, dict[str, Any]], probe: str, load_text: str,
                 partition_s: float, step_timeout_s: float) -> dict[str, Any]:  # fmt: skip
    """Break the host of `experts-0` of the serving copy `s` under load, as `scenario` says; the report."""
    url = s["url"]
    handle = serve.get_deployment_handle("LLMServer", app_name="mixtral")
    before = {w["name"]: w["node_ip"] for w in handle.workers.remote().result()}
    victim = before["experts-0"]
    victim_node = _node_id(victim)
    census_before = census()
    report: dict[str, Any] = {"scenario": scenario}
    # Requests sent while no copy can serve wait in Serve's queue (bounded by serving.request_timeout_s)
    # until one can: the clients wait longer than the outage.
    with Load(url, s["grpc"], timeout_s=300) as load:
        time.sleep(2.0)  # requests are decoding
        broken = time.monotonic()
        if scenario == "partition":
            subprocess.run(hosts[victim]["down"], check=True)
            time.sleep(partition_s)
            subprocess.run(hosts[victim]["up"], check=True)
            report["link_down_s"] = time.monotonic() - broken
            report["host_restarted"] = not rejoined(victim_node, hosts[victim])
        else:
            report["killed_processes"] = kill_namespace(hosts[victim]["namespace"])
            load.wait_ended(broken, timeout_s=step_timeout_s + 15)  # each in flight: done (replaced) or 503
            if scenario == "crash-no-room":  # its supervisor starts Ray again, once Ray has called the node dead
                _dead(victim_node)
                report["host_back_after_s"] = time.monotonic() - broken
                back = subprocess.run(hosts[victim]["restart"], capture_output=True, text=True)
                assert back.returncode == 0, back.stderr[-2000:]
        restored = time.monotonic()
        report["serving_again_s"] = wait_until_serving(url, probe, timeout_s=240)  # after the host is back
    census_after = census_back(census_before, timeout_s=10)  # the replaced copy's old actors are reaped
    after_workers = handle.workers.remote().result()
    stats = handle.stats.remote().result()
    in_flight = load.in_flight(broken)
    return report | {
        "victim": victim,
        "lost": sorted(n for n, ip in before.items() if ip == victim),
        "before": before,
        "after": {w["name"]: w["node_ip"] for w in after_workers},
        "requests": len(load.records),
        "in_flight": len(in_flight),
        "kinds_in_flight": sorted({r["kind"] for r in in_flight}),
        "in_flight_outcomes": sorted({_outcome(r) for r in in_flight}),
        "in_flight_ended_s": max((r["end"] - broken for r in in_flight), default=0.0),
        "in_flight_ends": [(r["kind"], round(r["end"] - broken, 2), _message(r)) for r in in_flight],
        "first_503_s": min((r["end"] - broken for r in in_flight if _outcome(r) == "503"), default=None),
        "outcomes": sorted({_outcome(r) for r in load.records}),
        "failed": [(r["kind"], r["outcome"]) for r in load.records if r["outcome"] not in ("200", "OK")],
        "wrong": sum(r["text"] != load_text for r in load.records if r["outcome"] in ("200", "OK")),
        "stall_s": load.stall(broken),
        "recoveries": stats["recoveries"],
        "restored_after_s": restored - broken,
        "blocks_in_use": stats["blocks_in_use"],
        "census_before": census_before,
        "census_after": census_after,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--address", required=True)
    p.add_argument("--checkpoint", required=True, type=Path)
    p.add_argument("--scenario", choices=SCENARIOS, nargs="+", default=["crash"],
                   help="run one after another on the same serving app, each on the copy the last left")  # fmt: skip
    p.add_argument("--hosts", required=True, help="JSON: node IP -> {namespace, restart, down, up} of each model host")
    p.add_argument("--partition-s", type=float, default=30.0)
    p.add_argument("--step-timeout-s", type=float, default=300.0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    hosts: dict[str, dict[str, Any]] = json.loads(args.hosts)
    with LLM(args.checkpoint, single_process=True) as reference:
        probe = reference.generate([PROMPT], SamplingParams(max_tokens=8, temperature=0.0))[0].text
        load_text = reference.generate([Load.PROMPT], SamplingParams(max_tokens=Load.MAX_TOKENS, temperature=0.0))[0]
    connect_ray(args.address)
    sections = {
        "cluster": {"placement_strategy": "SPREAD", "worker_resources": {"model_slot": 1}},
        "engine": {"step_timeout_s": args.step_timeout_s},
        "serving": {"health_check_period_s": 1, "retry_after_s": 3},
    }
    reports = {}
    with serving(args.checkpoint, **sections) as s:
        wait_until_serving(s["url"], probe, timeout_s=240)
        for scenario in args.scenario:
            reports[scenario] = run_scenario(scenario, s, hosts, probe, load_text.text, args.partition_s,
                                             args.step_timeout_s)  # fmt: skip
    print(json.dumps(reports))
    return 0


if __name__ == "__main__":
    sys.exit(main())
