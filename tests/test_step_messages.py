"""What each worker is sent per step: its own part (`step_messages`), with only the block-table
entries that changed; the shard's tables stay the engine's through windows, preemption and forks."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from benchmarks import step_messages as bench
from cluster.backend.local_backend import LocalBackend
from cluster.backend.placement import Layout, worker_specs
from cluster.engine.core import Engine
from cluster.engine.request import SamplingParams
from cluster.llm import LLM
from model.config import ModelConfig
from model.sampling import DrawParams
from protocol.shard_runner import ShardRunner
from protocol.step import SeqChunk, ShardBatch, step_messages
from tests.support.common import ENGINE_CONFIG, random_prompts, reference_greedy

pytestmark = pytest.mark.unit


def test_each_role_gets_its_own_part() -> None:
    specs = worker_specs(Layout(attention_shards=3, routers=2, expert_groups=2), num_experts=8)
    batches = [ShardBatch([SeqChunk(f"r{a}", [1] * (a + 2), 0, [a], False)]) for a in range(3)]
    messages = step_messages(batches, specs)
    by_name = {s.name: m for s, m in zip(specs, messages, strict=True)}
    assert [by_name[f"attention-{a}"] is batches[a] for a in range(3)] == [True] * 3
    # Shards 0 and 2 go to router 0, shard 1 to router 1: each router hears its shards' row counts.
    assert by_name["router-0"] == [2, 4] and by_name["router-1"] == [3]
    assert by_name["experts-0"] is None and by_name["experts-1"] is None


def test_a_shard_refuses_a_delta_it_cannot_apply() -> None:
    runner = ShardRunner(ModelConfig.preset("tiny"), 8, 4, torch.float32, torch.device("cpu"))
    runner.begin(ShardBatch([SeqChunk("a", [1], 0, [3, 4], False)]))
    runner.begin(ShardBatch([SeqChunk("a", [1], 0, [5], False, blocks_from=2)]))
    assert runner.tables["a"] == [3, 4, 5]
    runner.begin(ShardBatch([SeqChunk("a", [1], 0, [6], False, blocks_from=1)]))  # a window freed, a preemption
    assert runner.tables["a"] == [3, 6]
    with pytest.raises(ValueError, match="changes from entry 5, but this shard holds 2"):
        runner.begin(ShardBatch([SeqChunk("a", [1], 0, [7], False, blocks_from=5)]))
    runner.begin(ShardBatch(finished=["a"]))
    assert runner.tables == {}


def test_a_step_run_again_draws_nothing_new() -> None:
    """The backend runs a step again after replacing a router or an expert group that died once a
    shard had drawn: that shard returns its first draws, so its generators and penalties' records
    advance once per step. Seeded, penalised draws with every step run twice equal the same steps
    run once."""
    vocab = ModelConfig.preset("tiny").vocab_size
    params = DrawParams(temperature=1.0, seed=3, frequency_penalty=1.0, presence_penalty=1.0)
    logits = [torch.full((1, vocab), -30.0) for _ in range(12)]  # four likely tokens: penalties decide
    for i, row in enumerate(logits):
        row[0, :4] = torch.randn(4, generator=torch.Generator().manual_seed(i))

    def draws(runs_per_step: int) -> list[int]:
        runner = ShardRunner(ModelConfig.preset("tiny"), 8, 4, torch.float32, torch.device("cpu"))
        tokens: list[int] = []
        for i, row in enumerate(logits):
            first = SeqChunk("a", [1], i, [0] if i == 0 else [], True, params if i == 0 else None,
                             output=[] if i == 0 else None, blocks_from=0 if i == 0 else 1)  # fmt: skip
            batch = ShardBatch([first], step=i + 1)
            got = []
            for _ in range(runs_per_step):
                runner.begin(batch)
                got.append(runner.draw(batch, row, [(0, 1)]))
            assert all(g == got[0] for g in got)
            tokens.append(got[0][0].token)
        return tokens

    assert draws(runs_per_step=2) == draws(runs_per_step=1)


@pytest.fixture(scope="module")
def ckpt(checkpoint_factory: Any) -> Any:
    return checkpoint_factory(ENGINE_CONFIG, seed=5)


def test_the_shards_tables_follow_the_engines_through_windows_preemption_and_forks(ckpt: Any) -> None:
    """Few blocks (preemption), a 12-token window (blocks freed as sequences advance), n=2 (forks):
    after every step each running sequence's table on the shard is the scheduler's, while the
    chunks carried only what changed; the outputs are the reference's."""
    with LLM(ckpt, single_process=True, block_size=4, num_blocks=24, max_batched_tokens=64, max_seqs=16) as llm:
        engine: Engine = llm.engine
        backend = engine.backend
        assert isinstance(backend, LocalBackend)
        prompts = random_prompts(24, seed=4, low=6, high=30)
        greedy = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)

        sent = whole = 0
        execute = backend.execute

        def counting(batches: list[ShardBatch]) -> Any:
            nonlocal sent, whole
            result = execute(batches)
            for c in (c for b in batches for c in b.chunks):
                sent += len(c.new_blocks)
                whole += len(backend.shard.tables[c.request_id])
            running = [s for s in engine.scheduler.running if s.request_id in backend.shard.tables]
            assert all(backend.shard.tables[s.request_id] == s.block_table for s in running)
            return result

        backend.execute = counting  # type: ignore[method-assign]
        outs = llm.generate(prompts, greedy)
        forked = llm.generate(prompts[:2], SamplingParams(max_tokens=8, temperature=0.8, seed=3, n=2))
        assert engine.scheduler.num_preemptions > 0  # the small pool preempted some
        assert [o.token_ids for o in outs] == reference_greedy(ckpt, prompts, 20)
        assert len(forked) == 4 and all(len(o.token_ids) == 8 for o in forked)
        assert sent < whole / 3, (sent, whole)  # most steps carry no table at all
        # Finished sequences are dropped on the shard with the next step; none is left from earlier ones.
        assert (
            set(backend.shard.tables)
            == set(engine.shards._drops[0])
            == {o.request_id for o in forked} | {f"{o.request_id}#choice1" for o in forked if o.index == 0}
        )


class _Forgetful(set[str]):
    """An engine's record of what a shard keeps that keeps nothing: every chunk carries it all."""

    def add(self, item: str) -> None:
        pass


def test_draw_settings_travel_once_and_penalised_forked_draws_match_sending_them_every_step(ckpt: Any) -> None:
    """The shard keeps each sequence's draw settings and, under penalties, the tokens it drew: only
    a request's first draw carries them (its forks take choice 0's on the shard), and through
    preemption (few blocks) and n=2 forks the seeded, penalised outputs equal an engine's that
    sends them with every chunk."""
    params = SamplingParams(max_tokens=12, temperature=0.05, seed=7, n=2, frequency_penalty=2.0,
                            presence_penalty=2.0, repetition_penalty=1.3, bad_token_ids=list(range(100, 400)),
                            logit_bias={7: 3.0})  # fmt: skip
    prompts = random_prompts(8, seed=9, low=4, high=24)

    def run(every_chunk: bool) -> tuple[list[list[int]], int, int, int]:
        with LLM(ckpt, single_process=True, block_size=4, num_blocks=24, max_batched_tokens=64, max_seqs=16) as llm:
            engine: Engine = llm.engine
            backend = engine.backend
            assert isinstance(backend, LocalBackend)
            if every_chunk:
                engine.shards._primed = [_Forgetful() for _ in engine.shards._primed]
            carried = drawn = 0
            execute = backend.execute

            def counting(batches: list[ShardBatch]) -> Any:
                nonlocal carried, drawn
                for c in (c for b in batches for c in b.chunks):
                    carried += c.params is not None
                    drawn += c.sample
                return execute(batches)

            backend.execute = counting  # type: ignore[method-assign]
            outs = llm.generate(prompts, params)
            return [o.token_ids for o in outs], carried, drawn, engine.scheduler.num_preemptions

    once, carried, drawn, preemptions = run(every_chunk=False)
    every, carried_every, drawn_every, _ = run(every_chunk=True)
    assert preemptions > 0  # the small pool preempted some
    assert once == every and all(len(t) == 12 for t in once)
    assert carried == len(prompts) < drawn  # each request's first draw, nothing after
    assert carried_every == drawn_every


def test_the_benchmark_measures_fewer_bytes_per_role_and_fewer_again_with_deltas() -> None:
    r = bench.run(Layout(2, 1, 4), ModelConfig.preset("mixtral-8x7b"), seqs=32, context=2048, prefill=512,
                  block_size=16)  # fmt: skip
    decode = r["decode"]
    whole, per_role, delta = (decode[k]["bytes_total"] for k in ("whole_plan", "per_role", "per_role_delta"))
    assert whole == r["workers"] * decode["whole_plan"]["bytes_max_worker"]
    assert delta < per_role < whole
    assert decode["by_role"]["experts"] <= 10 and decode["by_role"]["router"] < 100
