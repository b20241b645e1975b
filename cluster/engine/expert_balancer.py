"""Where the experts' load goes, and when to place them anew: the engine's expert balancer.

The engine hands it each step's counts (`record`); it keeps them since the experts were last
placed (what a re-placement is computed from and what `load` reports), and between steps
(`maintain`) it starts a re-placement when one is due and switches to it once the backend has
moved the weights. Steps go on all the while: the backend moves weights beside them.

Shapes: L layers, E experts, G expert groups.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import time
from collections.abc import Sequence
from typing import Any, Protocol

import torch

from protocol.expert_cost import ExpertCost
from protocol.experts import AnyPlacement

logger = logging.getLogger(__name__)

RECORDED_STEPS = 256  # the last steps' expert counts kept for the planner (`RecordedStep`)
RecordedStep = tuple[str, list[list[int]]]  # (phase, [layer][expert] -> pairs) of one step


def imbalance(group_tokens: Sequence[float]) -> float:
    """The heaviest group's tokens over the mean over groups (1.0: even; G: one group has all)."""
    mean = sum(group_tokens) / len(group_tokens)
    return max(group_tokens) / mean if mean > 0 else 1.0


def layer_imbalance(group_tokens: Sequence[Sequence[float]]) -> float:
    """The mean over layers (those with tokens) of each layer's `imbalance`: each layer waits for
    its heaviest group, so that is what a step pays."""
    rows = [imbalance(row) for row in group_tokens if sum(row) > 0]
    return sum(rows) / len(rows) if rows else 1.0


class Placer(Protocol):
    """What the balancer needs of a backend: its groups, its cost model, and the two halves of a
    re-placement."""

    num_groups: int  # expert groups (1 in one process)
    cost: ExpertCost  # the cost model the routers split replicated experts' pairs by

    def begin_rebalance(
        self,
        expert_counts: torch.Tensor,
        group_tokens: torch.Tensor,
        steps: list[RecordedStep],
        placement: AnyPlacement | None = None,
    ) -> dict[str, Any]:
        """Place the experts anew for the load `expert_counts` [L, E] (whose pairs went to the groups as
        `group_tokens` [L, G]; `steps`: the last steps' own counts), or as `placement` says, and start
        moving weights; the report of what it will do, or why it keeps the placement it has
        ("refused"). Steps go on."""
        ...

    def finish_rebalance(self) -> dict[str, Any] | None:
        """Between steps: switch to the new placement once its weights are in place (its report), else None."""
        ...


class ExpertBalancer:
    """The load since the last placement, and the re-placement state machine: idle -> moving
    (weights travel while steps run) -> switched (counts start again)."""

    def __init__(self, placer: Placer, num_layers: int, num_experts: int, interval_s: float | None) -> None:
        self.placer = placer
        self.interval_s = interval_s  # re-place this often (None: only when asked)
        self.expert_counts = torch.zeros(num_layers, num_experts, dtype=torch.long)  # [L, E] since start
        # Since the experts were last placed: what the next re-placement is computed from.
        self.since_counts = torch.zeros(num_layers, num_experts, dtype=torch.long)  # [L, E]
        self.since_groups = torch.zeros(num_layers, placer.num_groups, dtype=torch.long)  # [L, G]
        self.since_cost: dict[str, list[float]] = {}  # phase -> [layer times' sum s, ideal times' s, steps]
        self.recorded: collections.deque[RecordedStep] = collections.deque(maxlen=RECORDED_STEPS)
        self.moving = False  # a re-placement's weights are on their way
        self.rebalances = 0  # re-placements done (or refused)
        self.last_rebalance: dict[str, Any] | None = None
        self._placed_at = time.monotonic()
        self._waiting: list[concurrent.futures.Future[dict[str, Any]]] = []  # for the next report

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
            acc[0] += self.placer.cost.layer_time(seconds)
            acc[1] += self.placer.cost.ideal_time(seconds)
        acc[2] += 1

    def begin(
        self, done: concurrent.futures.Future[dict[str, Any]] | None = None, placement: AnyPlacement | None = None
    ) -> None:
        """Place the experts anew from the load since the last placement (or as `placement` says);
        weights move while steps go on, and `maintain` switches to it between two steps. `done` gets
        the re-placement's report (this one's, or that of one already under way)."""
        if not self.moving:
            report = self.placer.begin_rebalance(
                self.since_counts.clone(), self.since_groups.clone(), list(self.recorded), placement
            )  # raises before anything waits on it (RebalanceUnavailable, a malformed placement)
        if done is not None:
            self._waiting.append(done)
        if self.moving:
            return
        if report.get("refused"):  # the placement stays: done, and the load keeps being counted
            logger.info("re-placement refused: %s", report["refused"])
            self._done(report, restart=False)
        else:
            self.moving = True

    def abandon(self, error: Exception) -> None:
        """The engine stops: whoever waits for a report gets `error` instead."""
        waiting, self._waiting = self._waiting, []
        for w in waiting:
            w.set_exception(error)

    def maintain(self) -> None:
        """Between steps: finish a re-placement whose weights are ready, or start one when it is due."""
        if self.moving:
            report = self.placer.finish_rebalance()
            if report is not None:
                self.moving = False
                self._done(report, restart="refused" not in report)  # abandoned: the load goes on counting
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
