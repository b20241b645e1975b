"""Automatic prefix caching: full KV blocks keyed by their prefix are reused by later requests,
evicted least recently used only when free blocks run out, and change nothing in the outputs:
token for token equal with the cache off, under preemption, aborts and a sliding window."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from cluster.engine.block_pool import BlockPool, block_key
from cluster.engine.request import SamplingParams
from cluster.engine.scheduler import Scheduler
from cluster.llm import LLM
from tests.support.common import ENGINE_CONFIG, random_prompts

pytestmark = pytest.mark.ray

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


def test_keys_name_a_block_and_everything_before_it() -> None:
    a = block_key(None, [1, 2, 3, 4])
    assert block_key(None, [1, 2, 3, 4]) == a and len(a) == 16
    assert block_key(a, [5, 6]) != block_key(block_key(None, [9, 2, 3, 4]), [5, 6])  # same block, other prefix
    assert block_key(None, [1, 2, 3, 4]) != block_key(None, [4, 3, 2, 1])


def test_cached_blocks_are_evicted_least_recently_used_and_only_when_no_block_is_free() -> None:
    pool = BlockPool(4)
    keys = [block_key(None, [i]) for i in range(3)]
    held = [pool.allocate() for _ in range(3)]
    for block, key in zip(held, keys, strict=True):
        pool.register(block, key)  # type: ignore[arg-type]
    for block in held:
        pool.free(block)  # type: ignore[arg-type]  # unheld but cached, least recently used first: 0, 1, 2
    assert (pool.num_used, pool.num_free, pool.num_cached) == (0, 4, 3)
    pool.share(held[0])  # block 0 is used again: now the most recent
    pool.free(held[0])  # type: ignore[arg-type]
    fresh = pool.allocate()
    assert fresh not in held and pool.num_cached == 3  # a free block first: nothing evicted
    evicted = pool.allocate()
    assert evicted == held[1] and pool.cached_prefix([keys[1]]) == []  # then the least recently used
    assert pool.cached_prefix(keys) == [held[0]]  # the chain breaks at the evicted key
    with pytest.raises(ValueError, match="double free"):
        pool.free(999)


def test_a_request_goes_to_the_shard_holding_its_prefix() -> None:
    s = Scheduler(num_shards=2, blocks_per_shard=16, block_size=4, max_batched_tokens=64)
    prefix = list(range(100, 112))  # three full blocks
    a = s.add("a", prefix + [1, 2], max_tokens=2)
    s.advance(s.schedule().chunks)  # a's prompt is computed: its three full blocks are cached
    filler = s.add("f", [7, 8, 9], max_tokens=2)  # takes the other shard (more free blocks)
    s.advance(s.schedule().chunks)
    assert filler.shard != a.shard
    assert s.blocks.pools[filler.shard].num_free > s.blocks.pools[a.shard].num_free
    b = s.add("b", prefix + [3], max_tokens=2)
    sched = s.schedule()
    assert b.shard == a.shard and b.cached_tokens == 12  # the prefix's shard, though it has fewer free blocks
    assert [(c.start, c.end) for c in sched.chunks if c.seq is b] == [(12, 13)]


def _run(llm: LLM, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
    return [o.token_ids for o in llm.generate(prompts, params)]


@pytest.fixture(scope="module")
def ckpt(checkpoint_factory: Any) -> Any:
    return checkpoint_factory(ENGINE_CONFIG, seed=5)


def shared_prefix_prompts(n: int, seed: int, prefix_len: int = 21) -> list[list[int]]:
    prefix = random_prompts(1, seed=seed, low=prefix_len, high=prefix_len)[0]
    return [prefix + p[1:] for p in random_prompts(n, seed=seed + 1, low=2, high=12)]


def test_the_second_request_of_a_prefix_is_served_from_the_cache(ckpt: Any) -> None:
    prompts = shared_prefix_prompts(2, seed=3)
    with LLM(ckpt, single_process=True, block_size=4, num_blocks=128) as cached, \
         LLM(ckpt, single_process=True, block_size=4, num_blocks=128, prefix_caching=False) as plain:  # fmt: skip
        first, second = (cached.generate([p], GREEDY)[0] for p in prompts)
        assert first.cached_tokens == 0 and second.cached_tokens == 20  # 5 of the 21-token prefix's blocks
        assert [first.token_ids, second.token_ids] == _run(plain, prompts, GREEDY)
        again = cached.generate([prompts[0]], GREEDY)[0]
        assert again.token_ids == first.token_ids and again.cached_tokens == 4 * ((len(prompts[0]) - 1) // 4)
        assert plain.generate([prompts[0]], GREEDY)[0].cached_tokens == 0
        assert cached.stats()["blocks_in_use"] == 0  # cached blocks are held by no one


@pytest.mark.parametrize("window", [None, 12], ids=["full", "window12"])
def test_outputs_with_the_cache_equal_outputs_without_under_preemption_and_aborts(
    checkpoint_factory: Any, window: int | None
) -> None:
    path = checkpoint_factory(ENGINE_CONFIG.model_copy(update={"sliding_window": window}), seed=5)
    prompts = shared_prefix_prompts(40, seed=11) + shared_prefix_prompts(40, seed=12, prefix_len=30)
    engine = {"block_size": 4, "num_blocks": 40, "max_batched_tokens": 48, "max_seqs": 24}  # forces preemption
    with LLM(path, single_process=True, prefix_caching=False, **engine) as plain:
        expected = _run(plain, prompts, GREEDY)
    with LLM(path, single_process=True, **engine) as cached:
        assert _run(cached, prompts[:40], GREEDY) == expected[:40]

        async def with_aborts() -> list[list[int]]:
            async def one(p: list[int], abort_after: int | None) -> list[int]:
                tokens: list[int] = []
                async for out in cached.stream(p, GREEDY):
                    tokens = out.token_ids
                    if abort_after is not None and len(tokens) >= abort_after:
                        break  # closing the stream aborts: its blocks go back, some stay cached
                return tokens

            return list(await asyncio.gather(*(one(p, 2 if i % 5 == 0 else None) for i, p in enumerate(prompts))))

        got = asyncio.run(with_aborts())
        assert cached.engine.scheduler.num_preemptions > 0
        assert sum(o.cached_tokens > 0 for o in cached.generate(prompts[40:], GREEDY)) > 0
        assert cached.stats()["blocks_in_use"] == 0
    for i, (ours, theirs) in enumerate(zip(got, expected, strict=True)):
        assert ours == (theirs[: len(ours)] if i % 5 == 0 else theirs)
