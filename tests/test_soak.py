"""The short soak CI runs: mixed streamed, non-streamed and abandoned requests for ~20 s must
leave no KV block held, no extra actor, no memory growth, and unchanged greedy answers
(`mixtral-cluster soak --minutes 10` is the long version)."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.soak import soak
from cluster.backend.placement import Layout
from tests.support.common import ENGINE_CONFIG

pytestmark = pytest.mark.serve


def test_short_soak_leaks_nothing(checkpoint_factory) -> None:
    ckpt: Path = checkpoint_factory(ENGINE_CONFIG, seed=5)
    result = soak(ckpt, Layout(1, 1, 2), seconds=20, concurrency=8)
    assert result["problems"] == []
    assert len(result["waves"]) >= 2 and result["requests"] >= 16
    assert sum(w["abandoned"] for w in result["waves"]) > 0  # cancellations were exercised
