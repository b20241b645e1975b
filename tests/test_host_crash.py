"""A host crashes under load (`tests/hosts.py` hosts; every process of its namespace killed at once):
a head (ingress, proxy, the copy's engine) and three model hosts with two model slots each, the
copy's four workers spread over them. The host of `experts-0` dies while plain, streamed and gRPC
requests decode: its workers are replaced on the slots left on the other hosts, no request fails,
every answer equals the fault-free one. The stall a client saw is logged (RELIABILITY.md)."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import ENGINE_CONFIG
from tests.hosts import Hosts, unavailable

pytestmark = [pytest.mark.hosts, pytest.mark.skipif(unavailable() is not None, reason=unavailable() or "")]
FAST_FAILURE = {"health_check_period_ms": 500, "health_check_failure_threshold": 4}  # a dead host known in ~2 s


@pytest.fixture(scope="module")
def hosts() -> Iterator[Hosts]:
    with Hosts(4) as hs:
        slots = json.dumps({"model_slot": 2})
        hs.start_ray([4, 0, 0, 0], [None, slots, slots, slots], system_config=FAST_FAILURE)
        yield hs


def test_a_crashed_host_is_replaced_on_the_others_and_no_request_fails(hosts: Hosts, checkpoint_factory: Any) -> None:
    ckpt: Path = checkpoint_factory(ENGINE_CONFIG, seed=5)
    model_hosts = {h.ip: {"namespace": h.name} for h in hosts.hosts[1:]}
    argv = [sys.executable, "-m", "tests.host_faults", "--scenario", "crash", "--address", hosts.head_address,
            "--checkpoint", str(ckpt), "--hosts", json.dumps(model_hosts)]  # fmt: skip
    r = hosts.run(hosts.hosts[0], argv, timeout_s=480, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(r.stdout.strip().splitlines()[-1])["crash"]
    assert report["killed_processes"] > 0 and report["lost"], report
    assert report["in_flight"] > 0 and len(report["kinds_in_flight"]) >= 2, report
    brief = {k: report[k] for k in ("victim", "lost", "in_flight_outcomes", "recoveries", "serving_again_s")}
    brief |= {"failed": len(report["failed"]), "first_ends": report["in_flight_ends"][:4]}
    assert report["failed"] == [] and report["wrong"] == 0, brief  # the whole report is too long to read
    assert sorted(report["after"]) == sorted(report["before"])
    assert report["victim"] not in report["after"].values(), report  # replaced on the hosts left
    assert set(report["after"].values()) <= set(model_hosts) - {report["victim"]}
    logging.getLogger(__name__).info(
        "host %s crashed (%s): %d requests in flight, 0 failed; longest stall %.2f s; recovered in %s s",
        report["victim"], ", ".join(report["lost"]), report["in_flight"], report["stall_s"],
        [round(x["seconds"], 1) for x in report["recoveries"]],
    )  # fmt: skip
