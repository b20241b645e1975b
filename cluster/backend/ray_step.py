"""One step on every worker of a copy, with failure detection: call each worker with its part,
gather them, and bound the wait.

Survivors of a dead worker fail fast: each tears its data plane down, so the peers blocked on it
fail too; a silent peer fails them at the data plane's deadline (`cluster.data_plane_timeout_s`).
Once one worker has failed, the others have `UNREACHABLE_GRACE_S` to answer. A worker still silent
then whose host has lost its Ray (a crash Ray has not yet noticed) is waited for up to
`DEAD_VERDICT_S` more, until Ray calls it dead, and is then replaced; if the cluster has no room
for it, the copy is given up at once. One whose host does not answer at all is on a host the engine
cannot reach: the copy is given up at once, not after `step_timeout_s`. What to do with the outcome
is the recovery's (`ray_recovery`).

The workers' own deadline may not hold (one blocked on a link that drops its packets), so a step
still running `data_plane_timeout_s` + `UNREACHABLE_GRACE_S` after it began has its silent workers'
hosts probed (then every `UNREACHABLE_GRACE_S`): one that does not answer gives the copy up then too.
"""

from __future__ import annotations

import time
from typing import Any

import ray
from ray.exceptions import RayActorError, RayError

from actors.data_plane import DataPlaneBroken
from cluster.backend.ray_recovery import DEAD_VERDICT_S, UNREACHABLE_GRACE_S, Recovery, StepOutcome
from cluster.backend.ray_workers import Workers
from cluster.engine.backend import EngineError
from protocol.step import StepMessage


def step_everywhere(
    workers: Workers,
    messages: list[StepMessage],
    recovery: Recovery,
    step_timeout_s: float,
    data_plane_timeout_s: float,
) -> StepOutcome:
    """Run a step on every worker and wait for all of them, or give the copy up (shut down,
    `EngineError`) where a silent worker's host is unreachable, or gone with no room to replace it,
    or the step ran out of time."""
    refs = [a.step.remote(m) for a, m in zip(workers.actors, messages, strict=True)]
    outcome: dict[int, Any] = {}  # worker -> result, or the exception its step raised
    pending = list(refs)
    began = time.monotonic()
    step_deadline = began + step_timeout_s
    deadline, awaiting_verdict = step_deadline, False
    probe_at = began + data_plane_timeout_s + UNREACHABLE_GRACE_S
    unreachable: list[int] = []
    no_room: list[int] = []
    while pending:
        until = min(deadline, probe_at)
        ready, pending = ray.wait(pending, num_returns=1, timeout=max(until - time.monotonic(), 0.0))
        if not ready:  # a deadline or the probe time: which workers are silent, and why
            silent = [refs.index(r) for r in pending]
            if time.monotonic() < deadline:  # probe time: is each silent worker's host there?
                unreachable = [i for i, state in recovery.host_states(silent).items() if state == "unreachable"]
                if unreachable:
                    break
                probe_at = time.monotonic() + UNREACHABLE_GRACE_S
                continue
            peer_failed = any(isinstance(o, RayError) for o in outcome.values())
            if (peer_failed and not awaiting_verdict
                    and all(state == "gone" for state in recovery.host_states(silent).values())):  # fmt: skip
                # A crash: Ray calls the host dead within its health checks and fails these steps (on a
                # loaded machine that can take longer than the grace); they are replaced then, unless
                # there is no room for them: then nothing is gained by waiting for the verdict.
                if recovery.no_room_before_verdict(silent):
                    no_room = silent
                    break
                awaiting_verdict = True
                deadline = min(step_deadline, time.monotonic() + DEAD_VERDICT_S)
                continue
            break
        i = refs.index(ready[0])
        try:
            outcome[i] = ray.get(ready[0])
        except RayError as e:
            outcome[i] = e
            if not awaiting_verdict:
                deadline = min(deadline, time.monotonic() + UNREACHABLE_GRACE_S)
    if pending:
        _give_up(workers, [refs.index(r) for r in pending], unreachable, no_room, outcome, began,
                 step_timeout_s, data_plane_timeout_s)  # fmt: skip
    results: list[Any] = []
    dead: list[int] = []
    errors: dict[str, BaseException] = {}
    for i in range(len(refs)):
        o = outcome[i]
        if not isinstance(o, RayError):
            results.append(o)
            continue
        if isinstance(o, RayActorError):
            dead.append(i)
        elif not isinstance(o, DataPlaneBroken):  # a survivor of a dead peer fails with DataPlaneBroken
            errors[workers.specs[i].name] = o
        results.append(None)
    return StepOutcome(results, dead, errors)


def _give_up(
    workers: Workers,
    silent: list[int],
    unreachable: list[int],
    no_room: list[int],
    outcome: dict[int, Any],
    began: float,
    step_timeout_s: float,
    data_plane_timeout_s: float,
) -> None:
    """Shut the copy down and raise the `EngineError` that says why its `silent` workers end it."""
    workers.shutdown()
    names = ", ".join(workers.specs[i].name for i in silent)
    if no_room:
        raise EngineError(
            f"the host of worker {names} lost its Ray and there is no room left to place "
            f"{'it' if len(no_room) == 1 else 'them'} again: the copy is given up"
        )
    if unreachable:
        lost = ", ".join(workers.specs[i].name for i in unreachable)
        raise EngineError(
            f"the host of worker {lost} does not answer (partitioned or down) and the step has run "
            f"{time.monotonic() - began:.0f} s: the copy is given up"
        )
    if any(isinstance(o, RayError) for o in outcome.values()):
        raise EngineError(
            f"worker {names} did not answer within {UNREACHABLE_GRACE_S:.0f} s of its peers' data plane "
            f"failing (deadline cluster.data_plane_timeout_s = {data_plane_timeout_s:g} s): its host is "
            "unreachable (partitioned or down); the copy is given up"
        )
    raise EngineError(f"step timed out after {step_timeout_s:.0f} s waiting for {names}")
