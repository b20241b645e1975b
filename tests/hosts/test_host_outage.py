"""Model hosts lost under load (`tests/hosts/namespaces.py` hosts): a head (ingress, proxy, the copy's engine)
and three model hosts with two model slots each, the copy's four workers on them. Each time,
whichever host holds `experts-0` is broken while plain, streamed and gRPC requests decode. One
driver runs the three outages one after another on one serving app, each on the copy the one
before left, so each finds less room:

- A host crashes (every process of its namespace killed) with slots left on the others: its
  workers are replaced there, no request fails, every answer equals the fault-free one. The
  crashed host stays down, so the copy now fills the two hosts left.
- One of those crashes: nowhere to place its workers, so the in-flight requests end with 503 and
  Retry-After within `step_timeout_s`; when the host comes back (its `ray start` run again, as a
  supervisor would, once Ray has called it dead) a new copy serves, correctly, and nothing leaked.
- One is partitioned (its link down for 30 s, then up): the copy notices by its data plane's
  deadline (`cluster.data_plane_timeout_s`, 10 s, then 5 s of grace: within 15 s, not the step
  timeout), and in-flight requests end 503. Once the link is back the host rejoins: by itself if
  Ray still holds it alive; if Ray's health checks had called it dead meanwhile, its raylet exits
  on hearing so and its supervisor starts Ray again (on a real machine systemd or the launcher;
  here the driver). A new copy then serves at full size on both hosts. Requests sent meanwhile
  wait in Serve's queue (bounded by serving.request_timeout_s) and are served then.

The stalls and times go to the log (RELIABILITY.md)."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.hosts.namespaces import Hosts, unavailable
from tests.support.common import ENGINE_CONFIG

pytestmark = [pytest.mark.hosts, pytest.mark.skipif(unavailable() is not None, reason=unavailable() or "")]
# A killed host (its ports refuse at once) is known dead in ~2 s; a silent one takes Ray longer (each
# check waits out its own timeout), the data plane's deadline sees it first.
FAST_FAILURE = {"health_check_period_ms": 500, "health_check_failure_threshold": 4}
SLOTS = json.dumps({"model_slot": 2})
STEP_TIMEOUT_S = 30.0
logger = logging.getLogger(__name__)


@pytest.fixture(scope="module")
def hosts() -> Iterator[Hosts]:
    with Hosts(4) as hs:
        hs.start_ray([4, 0, 0, 0], [None, SLOTS, SLOTS, SLOTS], system_config=FAST_FAILURE)
        yield hs


@pytest.fixture(scope="module")
def reports(hosts: Hosts, checkpoint_factory: Any) -> dict[str, dict[str, Any]]:
    """The three outages, one after the other, on one serving app."""
    ckpt: Path = checkpoint_factory(ENGINE_CONFIG, seed=5)
    model_hosts = {
        h.ip: {
            "namespace": h.name,
            "restart": hosts.host_argv(h, hosts.join_argv(h, 0, SLOTS)),
            "down": hosts.link_argv(h, up=False),
            "up": hosts.link_argv(h, up=True),
        }
        for h in hosts.hosts[1:]
    }
    argv = [sys.executable, "-m", "tests.hosts.fault_driver", "--scenario", "crash", "crash-no-room", "partition",
            "--address", hosts.head_address, "--checkpoint", str(ckpt), "--hosts", json.dumps(model_hosts),
            "--step-timeout-s", str(STEP_TIMEOUT_S)]  # fmt: skip
    r = hosts.run(hosts.hosts[0], argv, timeout_s=720, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    found: dict[str, dict[str, Any]] = json.loads(r.stdout.strip().splitlines()[-1])
    return found


def test_a_crashed_host_is_replaced_on_the_others_and_no_request_fails(reports: dict[str, dict[str, Any]]) -> None:
    report = reports["crash"]
    assert report["killed_processes"] > 0 and report["lost"], report
    assert report["in_flight"] > 0 and len(report["kinds_in_flight"]) >= 2, report
    brief = {k: report[k] for k in ("victim", "lost", "in_flight_outcomes", "recoveries", "serving_again_s")}
    brief |= {"failed": len(report["failed"]), "first_ends": report["in_flight_ends"][:4]}
    assert report["failed"] == [] and report["wrong"] == 0, brief  # the whole report is too long to read
    assert sorted(report["after"]) == sorted(report["before"])
    assert report["victim"] not in report["after"].values(), report  # replaced on the hosts left
    assert report["census_after"] == report["census_before"], "actors or placement groups leaked"
    logger.info(
        "host %s crashed (%s): %d requests in flight, 0 failed; longest stall %.2f s; recovered in %s s",
        report["victim"], ", ".join(report["lost"]), report["in_flight"], report["stall_s"],
        [round(x["seconds"], 1) for x in report["recoveries"]],
    )  # fmt: skip


def _check(report: dict[str, Any]) -> None:
    assert report["in_flight"] > 0 and len(report["kinds_in_flight"]) >= 2, report
    assert report["in_flight_outcomes"] == ["503"], report  # each in-flight request: 503 + Retry-After
    assert set(report["outcomes"]) <= {"ok", "503"}, report  # nothing hung, nothing else went wrong
    assert report["wrong"] == 0, report
    # At full size again, on both model hosts, with nothing left over from the copy given up.
    assert sorted(report["after"]) == sorted(report["before"]), report
    assert set(report["after"].values()) == set(report["before"].values()), report
    assert report["census_after"] == report["census_before"], "actors or placement groups leaked"
    assert report["blocks_in_use"] == 0, report


def test_a_crashed_host_with_no_room_left_ends_requests_503_and_the_copy_returns_with_it(
    reports: dict[str, dict[str, Any]],
) -> None:
    report = reports["crash-no-room"]
    _check(report)
    assert report["in_flight_ended_s"] < STEP_TIMEOUT_S, report
    logger.info(
        "host %s crashed with no room elsewhere: %d in flight, all 503 within %.1f s (first %.1f s); the host "
        "back %.1f s after the crash, serving again %.1f s after that", report["victim"], report["in_flight"],
        report["in_flight_ended_s"], report["first_503_s"], report["host_back_after_s"], report["serving_again_s"],
    )  # fmt: skip


def test_a_partitioned_host_is_detected_by_the_data_plane_deadline_and_rejoins(
    reports: dict[str, dict[str, Any]],
) -> None:
    report = reports["partition"]
    _check(report)
    ends = {k: report[k] for k in ("in_flight_ends", "host_restarted", "link_down_s", "recoveries")}
    assert report["in_flight_ended_s"] < 15.0 + 3.0, ends  # detected within the bound, not the step timeout
    logger.info(
        "host %s partitioned for %.0f s: %d in flight, all 503 within %.1f s; serving at full size %.1f s "
        "after the link came back (%s)", report["victim"], report["link_down_s"], report["in_flight"],
        report["in_flight_ended_s"], report["serving_again_s"],
        "its Ray restarted" if report["host_restarted"] else "it rejoined by itself",
    )  # fmt: skip
