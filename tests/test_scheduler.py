"""Continuous batching decisions, without a model: budgets, chunks, windows, preemption."""

from __future__ import annotations

import pytest

from cluster.engine.scheduler import Scheduler, Status
from model.kv_cache import FREED

pytestmark = pytest.mark.unit


def run_step(s: Scheduler, sample_token: int = 7) -> list[tuple[str, int, int]]:
    sched = s.schedule()
    s.advance(sched.chunks)
    for c in sched.chunks:
        if c.sample:
            c.seq.output.append(sample_token)
            if len(c.seq.output) >= c.seq.max_tokens:
                s.finish(c.seq)
    return [(c.seq.request_id, c.start, c.end) for c in sched.chunks]


def test_chunked_prefill_under_a_token_budget_shares_steps_with_decode() -> None:
    s = Scheduler(num_shards=1, blocks_per_shard=64, block_size=4, max_batched_tokens=8)
    s.add("a", list(range(3)), max_tokens=5)
    s.add("b", list(range(20)), max_tokens=2)
    assert run_step(s) == [("a", 0, 3), ("b", 0, 5)]  # a's whole prompt, b's first chunk
    assert run_step(s) == [("a", 3, 4), ("b", 5, 12)]  # a decodes while b prefills
    assert run_step(s) == [("a", 4, 5), ("b", 12, 19)]
    assert run_step(s) == [("a", 5, 6), ("b", 19, 20)]  # b's last chunk samples
    assert run_step(s) == [("a", 6, 7), ("b", 20, 21)]


@pytest.mark.parametrize("caching", [False, True])
def test_newest_sequence_is_preempted_and_recomputed(caching: bool) -> None:
    s = Scheduler(num_shards=1, blocks_per_shard=4, block_size=2, max_batched_tokens=16, prefix_caching=caching)
    a = s.add("a", [1, 2, 3], max_tokens=4)  # needs up to 4 blocks over its life
    b = s.add("b", [4, 5], max_tokens=4)
    run_step(s)  # a: 2 blocks, b: 1 block
    run_step(s)  # a at 4 tokens (2 blocks), b at 3 tokens (2 blocks): pool full
    sched = s.schedule()  # a needs a 3rd block: b (newest) gives way
    assert [p.request_id for p in sched.preempted] == ["b"]
    assert b.status is Status.WAITING and b.block_table == [] and b.num_computed == 0
    assert [c.seq.request_id for c in sched.chunks] == ["a"]
    s.advance(sched.chunks)
    a.output.append(9)
    while a.status is not Status.FINISHED:
        run_step(s)
    # b comes back with its prompt and its sampled tokens recomputed in one chunk; with the prefix
    # cache, from its first block, which it had filled and which no one has needed since.
    n = len(b.tokens)
    assert n == 4  # 2 prompt + 2 sampled before preemption
    assert run_step(s) == [("b", 2 if caching else 0, n)]
    while b.status is not Status.FINISHED:
        run_step(s)
    assert s.blocks_in_use() == 0


def test_a_lone_sequence_that_cannot_fit_preempts_itself_not_others() -> None:
    s = Scheduler(num_shards=1, blocks_per_shard=3, block_size=2, max_batched_tokens=16)
    s.add("a", [1, 2, 3, 4, 5], max_tokens=1)  # 3 blocks: fits exactly
    run_step(s)
    assert s.blocks_in_use() == 0


def test_sliding_window_keeps_a_bounded_block_count() -> None:
    s = Scheduler(num_shards=1, blocks_per_shard=8, block_size=4, max_batched_tokens=4, window=6)
    seq = s.add("long", list(range(10)), max_tokens=200)
    bound = s.blocks.max_blocks_per_sequence(210, s.max_batched_tokens)
    assert bound <= 4
    peak = 0
    while seq.status is not Status.FINISHED:
        run_step(s)
        peak = max(peak, seq.num_blocks_held)
        if seq.status is Status.RUNNING:
            live = [j for j, b in enumerate(seq.block_table) if b != FREED]
            # Every freed block ends before the oldest position the next query sees.
            assert min(live) * 4 + 3 >= seq.num_computed - 6 + 1 - 4
    assert peak <= bound
    assert s.blocks_in_use() == 0


def test_requests_too_big_for_a_shard_are_refused_up_front() -> None:
    s = Scheduler(num_shards=2, blocks_per_shard=4, block_size=4, max_batched_tokens=16)
    try:
        s.add("big", list(range(10)), max_tokens=10)
    except ValueError as e:
        assert "needs up to 5 KV blocks of 4 tokens, but a shard has 4" in str(e)
    else:
        raise AssertionError("expected a ValueError")


def test_sequences_spread_over_shards_by_free_blocks() -> None:
    s = Scheduler(num_shards=2, blocks_per_shard=8, block_size=4, max_batched_tokens=64)
    for i in range(4):
        s.add(f"r{i}", list(range(5 + i)), max_tokens=3)
    run_step(s)
    assert sorted(seq.shard for seq in s.running) == [0, 0, 1, 1]
