"""Per-step phase timing inside a worker, for the benchmark's step breakdown.

Off by default, and then one attribute check per phase. When on, each step gets a record of
seconds per phase (`attention`, `gating`, `exchange`, `expert_ffn`, ...) plus `total`; on a GPU
the device is synchronised at each boundary so the times are the kernels', not the launches'.
"""

from __future__ import annotations

import time
from types import TracebackType

import torch


class PhaseClock:
    def __init__(self, device: torch.device) -> None:
        self.enabled = False
        self.records: list[dict[str, float]] = []
        self._sync = torch.cuda.synchronize if device.type == "cuda" else None
        self._current: dict[str, float] = {}
        self._step_started = 0.0

    def begin_step(self) -> None:
        if self.enabled:
            self._current = {}
            self._step_started = self._now()

    def end_step(self) -> None:
        if self.enabled:
            self._current["total"] = self._now() - self._step_started
            self.records.append(self._current)

    def take(self) -> list[dict[str, float]]:
        """The records since the last call."""
        out, self.records = self.records, []
        return out

    def __call__(self, phase: str) -> _Span:
        """`with clock("gating"): ...` adds the block's time to this step's `gating` (spans may nest)."""
        return _Span(self, phase)

    def add(self, phase: str, seconds: float) -> None:
        self._current[phase] = self._current.get(phase, 0.0) + seconds

    def _now(self) -> float:
        if self._sync is not None:
            self._sync()
        return time.perf_counter()


class _Span:
    __slots__ = ("clock", "phase", "started")

    def __init__(self, clock: PhaseClock, phase: str) -> None:
        self.clock, self.phase, self.started = clock, phase, 0.0

    def __enter__(self) -> None:
        if self.clock.enabled:
            self.started = self.clock._now()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self.clock.enabled:
            self.clock.add(self.phase, self.clock._now() - self.started)
