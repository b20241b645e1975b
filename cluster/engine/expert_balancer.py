"""Where the experts' load goes, and when to place them anew: the engine's expert balancer.

The engine hands it each step's counts (`record`); it keeps them since the experts were last
placed (what a re-placement is computed from and what `load` reports). A re-placement (`begin`)
is planned here (`cluster.engine.expert_planner`) and staged by the backend, which reads the
weights beside the steps; between steps (`maintain`, from the engine's step) it switches once
the weights are in place, or starts a re-placement when one is due.

Shapes: L layers, E experts, G expert groups.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import time
from typing import Any

import torch

from cluster.engine.backend import ExpertWeights, RebalanceUnavailable
from cluster.engine.expert_planner import (
    RecordedStep,
    checked_placement,
    layer_imbalance,
    plan_placement,
    predict_steps,
)
from protocol.experts import AnyPlacement, Placement

logger = logging.getLogger(__name__)

RECORDED_STEPS = 256  # the last steps' expert counts kept for the planner (`RecordedStep`)


class ExpertBalancer:
    """The load since the last placement, and the re-placement state machine: idle -> moving
    (weights travel while steps run) -> switched (counts start again)."""

    def __init__(self, weights: ExpertWeights, num_layers: int, num_experts: int, interval_s: float | None) -> None:
        self.weights = weights
        self.interval_s = interval_s  # re-place this often (None: only when asked)
        self.expert_counts = torch.zeros(num_layers, num_experts, dtype=torch.long)  # [L, E] since start
        # Since the experts were last placed: what the next re-placement is computed from.
        self.since_counts = torch.zeros(num_layers, num_experts, dtype=torch.long)  # [L, E]
        self.since_groups = torch.zeros(num_layers, weights.num_groups, dtype=torch.long)  # [L, G]
        self.since_cost: dict[str, list[float]] = {}  # phase -> [layer times' sum s, ideal times' s, steps]
        self.recorded: collections.deque[RecordedStep] = collections.deque(maxlen=RECORDED_STEPS)
        self.moving = False  # a re-placement's weights are on their way
        self.rebalances = 0  # re-placements done (or refused)
        self.last_rebalance: dict[str, Any] | None = None
        self._placed_at = time.monotonic()
        self._waiting: list[concurrent.futures.Future[dict[str, Any]]] = []  # for the next report
        self._report: dict[str, Any] = {}  # the re-placement under way's

    def record(
        self, phase: str, expert_counts: torch.Tensor, group_tokens: torch.Tensor, group_seconds: torch.Tensor
    ) -> None:
        """One step's load: `expert_counts` [L, E], `group_tokens` [L, G] pairs and `group_seconds`
        [L, G] by the cost model; `phase` "prefill" (a prompt chunk in it) or "decode"."""
        self.expert_counts += expert_counts
        self.since_counts += expert_counts
        self.since_groups += group_tokens
        self.recorded.append((phase, expert_counts.tolist()))
        acc = self.since_cost.setdefault(phase, [0.0, 0.0, 0])
        for seconds in group_seconds.tolist():  # [G] per layer
            acc[0] += self.weights.cost.layer_time(seconds)
            acc[1] += self.weights.cost.ideal_time(seconds)
        acc[2] += 1

    def begin(
        self, done: concurrent.futures.Future[dict[str, Any]] | None = None, placement: AnyPlacement | None = None
    ) -> None:
        """Place the experts anew from the load since the last placement (or as `placement` says);
        weights move while steps go on, and `maintain` switches to it between two steps. `done` gets
        the re-placement's report (this one's, or that of one already under way)."""
        if not self.moving:  # raises before anything waits on it (RebalanceUnavailable, a malformed placement)
            report = self._plan(placement)
        if done is not None:
            self._waiting.append(done)
        if self.moving:
            return
        if report.get("refused"):  # the placement stays: done, and the load keeps being counted
            logger.info("re-placement refused: %s", report["refused"])
            self._done(report, restart=False)
        else:
            self.moving = True
            self._report = report

    def _plan(self, requested: AnyPlacement | None) -> dict[str, Any]:
        """Plan a placement for the steps recorded since the last one (without any, their summed
        counts as one step) by the cost model, or take `requested`, and have the backend stage it.
        The report: the placement, the measured pair imbalance and the predicted one, per phase
        the predicted expert ms per step before and after; or "refused", and nothing moves, where
        every placement predicts a slower phase."""
        current, w = self.weights.placement, self.weights
        if current is None:
            raise RebalanceUnavailable("re-placing experts needs expert groups; this copy runs in one process")
        steps = list(self.recorded) or [("all", self.since_counts.tolist())]
        new: Placement
        if requested is None:
            new, report = plan_placement(steps, current, w.slots, w.cost)
        else:  # as asked: what the model expects of it, taken whatever that is
            num_layers, num_experts = self.since_counts.shape
            new = checked_placement(requested, w.slots, num_layers, num_experts)
            report = {"requested": True, "predicted": predict_steps(steps, new, len(w.slots), w.cost)}
        report = {"imbalance_before": layer_imbalance(self.since_groups.tolist())} | report
        if "refused" in report:
            return report | {"moved": 0, "placement": _lists(current)}
        moved = w.stage_placement(new)
        logger.info("re-placing experts: %d expert weights to move", moved)
        return report | {"moved": moved, "placement": _lists(new)}

    def abandon(self, error: Exception) -> None:
        """The engine stops: whoever waits for a report gets `error` instead."""
        waiting, self._waiting = self._waiting, []
        for w in waiting:
            w.set_exception(error)

    def maintain(self) -> None:
        """Between steps: finish a re-placement whose weights are ready, or start one when it is due."""
        if self.moving:
            done, why = self.weights.switch_placement()
            if done:
                self.moving = False
                report = self._report
                if why is not None:  # abandoned: the placement stays, and the load goes on counting
                    logger.warning("re-placement abandoned: %s; the placement stays", why)
                    assert self.weights.placement is not None
                    report |= {"refused": f"{why}: the placement stays", "moved": 0,
                               "placement": _lists(self.weights.placement)}  # fmt: skip
                self._done(report, restart=why is None)
        elif self.interval_s is not None and time.monotonic() - self._placed_at >= self.interval_s:
            if self.since_counts.sum() > 0:
                self.begin()
            else:
                self._placed_at = time.monotonic()  # nothing to learn from yet

    @property
    def needs_maintenance(self) -> bool:
        """Whether `maintain` must run even while no request is in (a re-placement under way or due)."""
        return self.moving or self.interval_s is not None

    def load(self) -> dict[str, Any]:
        """Since the last placement: (token, expert) pairs per expert group (summed over layers) and
        their imbalance (per layer the heaviest group over the mean, averaged over layers); per phase
        the cost model's expert milliseconds per step (`ExpertCost.layer_time`, summed over layers)
        and its imbalance (that over the same work spread evenly)."""
        return {
            "tokens_per_group": self.since_groups.sum(dim=0).tolist(),
            "imbalance": layer_imbalance(self.since_groups.tolist()),
            "cost_imbalance": {p: slow / mean if mean > 0 else 1.0 for p, (slow, mean, _) in self.since_cost.items()},
            "expert_ms_per_step": {p: 1e3 * slow / n for p, (slow, _, n) in self.since_cost.items()},
        }

    def _done(self, report: dict[str, Any], restart: bool) -> None:
        self.rebalances += 1
        self.last_rebalance = report
        waiting, self._waiting = self._waiting, []
        for w in waiting:
            w.set_result(report)
        self._placed_at = time.monotonic()
        if restart:  # a new placement: its load is counted from nothing
            self.since_counts.zero_()
            self.since_groups.zero_()
            self.since_cost.clear()
            self.recorded.clear()


def _lists(placement: Placement) -> list[list[list[int]]]:
    return [[list(g) for g in layer] for layer in placement]
