"""A driver run on the head of a test-host cluster (`python -m tests.host_faults ...`): serves a copy
whose workers live on the model hosts, runs streamed and plain load against it, crashes the host
of `experts-0` (every process of that host's namespace killed at once) while requests decode, and
prints one JSON line: what the clients saw, where the workers are afterwards, and the recovery."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ray import serve

from cluster.engine import SamplingParams
from cluster.llm import LLM
from cluster.workers import connect_ray
from tests.serve_helpers import PROMPT, Load, serving, wait_until_serving


def crash(namespace: str) -> int:
    """Kill every process of a host (its network namespace): a machine that loses power."""
    pids = [int(p) for p in subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True,
                                           check=True).stdout.split()]  # fmt: skip
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return len(pids)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--address", required=True)
    p.add_argument("--checkpoint", required=True, type=Path)
    p.add_argument("--hosts", required=True, help="JSON: node IP -> namespace of each model host")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    hosts: dict[str, str] = json.loads(args.hosts)
    with LLM(args.checkpoint, single_process=True) as reference:
        probe = reference.generate([PROMPT], SamplingParams(max_tokens=8, temperature=0.0))[0].text
        load_text = reference.generate([Load.PROMPT], SamplingParams(max_tokens=Load.MAX_TOKENS, temperature=0.0))[0]
    connect_ray(args.address)
    sections = {
        "cluster": {"placement_strategy": "SPREAD", "worker_resources": {"model_slot": 1}},
        "serving": {"health_check_period_s": 1, "retry_after_s": 3},
    }
    report: dict[str, Any] = {}
    with serving(args.checkpoint, **sections) as s:
        url = s["url"]
        wait_until_serving(url, probe, timeout_s=240)
        handle = serve.get_deployment_handle("LLMServer", app_name="mixtral")
        before = {w["name"]: w["node_ip"] for w in handle.workers.remote().result()}
        victim = before["experts-0"]
        with Load(url, s["grpc"]) as load:
            time.sleep(2.0)  # requests are decoding
            killed = time.monotonic()
            report["killed_processes"] = crash(hosts[victim])
            time.sleep(15.0)  # and go on through the replacement
        after = {w["name"]: w["node_ip"] for w in handle.workers.remote().result()}
        stats = handle.stats.remote().result()
        in_flight = load.in_flight(killed)
        report |= {
            "victim": victim,
            "lost": sorted(n for n, ip in before.items() if ip == victim),
            "before": before,
            "after": after,
            "requests": len(load.records),
            "in_flight": len(in_flight),
            "kinds_in_flight": sorted({r["kind"] for r in in_flight}),
            "failed": [(r["kind"], r["outcome"]) for r in load.records if r["outcome"] not in ("200", "OK")],
            "wrong": sum(r["text"] != load_text.text for r in load.records if r["outcome"] in ("200", "OK")),
            "stall_s": load.stall(killed),
            "recoveries": stats["recoveries"],
            "serving_again_s": wait_until_serving(url, probe, timeout_s=60),
        }
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
