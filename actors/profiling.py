"""Per-step phase timing inside a worker, for the benchmark's step breakdown.

Off by default, and then one attribute check per phase. When on, each step gets a record of
seconds per phase (`attention`, `gating`, `exchange`, `expert_ffn`, ...) plus `total`; on a GPU
the device is synchronised at each boundary so the times are the kernels', not the launches'.
Spans nest, and a nested span's time is charged to it alone: `with clock("attention"):` around
the layer loop and `with clock("moe_wait"):` inside it give attention without the waits, so a
step's phases add up to its total.
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
        self._open: list[_Span] = []  # spans entered and not yet left, innermost last
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
        """`with clock("gating"): ...` adds the block's own time to this step's `gating`."""
        return _Span(self, phase)

    def _now(self) -> float:
        if self._sync is not None:
            self._sync()
        return time.perf_counter()


class _Span:
    __slots__ = ("clock", "nested", "phase", "started")

    def __init__(self, clock: PhaseClock, phase: str) -> None:
        self.clock, self.phase, self.started, self.nested = clock, phase, 0.0, 0.0

    def __enter__(self) -> None:
        if self.clock.enabled:
            self.started = self.clock._now()
            self.nested = 0.0
            self.clock._open.append(self)

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        clock = self.clock
        if clock.enabled and clock._open and clock._open[-1] is self:
            clock._open.pop()
            elapsed = clock._now() - self.started
            clock._current[self.phase] = clock._current.get(self.phase, 0.0) + elapsed - self.nested
            if clock._open:
                clock._open[-1].nested += elapsed
