"""The expert-sharded engine on a real local Ray cluster: every layout equals the single-process model."""

from __future__ import annotations

import asyncio
import shutil
import threading
import time
from pathlib import Path

import pytest
import ray

from cluster.backend.placement import param_bytes
from cluster.engine.backend import EngineError
from cluster.engine.request import RequestFailed, SamplingParams
from cluster.llm import LLM
from tests.support.common import (
    ENGINE_CONFIG,
    idle,
    local_ray,
    poisoned_copy,
    random_prompts,
    reference_greedy,
    staggered_streams,
)

pytestmark = pytest.mark.ray

# One expert per group (G=8) with two shards and two routers; one router to eight groups is each of
# its routers' case, and a layout of 10 more workers costs the suite ~28 s.
LAYOUTS = [(1, 1, 1), (1, 1, 2), (2, 1, 3), (2, 2, 8)]
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
SAMPLED = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=1234, ignore_eos=True)
PROMPTS = random_prompts(5, seed=21, low=2, high=40)  # mixed lengths, most longer than the window (12)
ENGINE_ARGS = dict(block_size=4, num_blocks=96, max_batched_tokens=32)


@pytest.fixture(scope="module", autouse=True)
def shared_ray() -> None:
    local_ray()


@pytest.fixture(scope="module")
def ckpt(checkpoint_factory):
    return checkpoint_factory(ENGINE_CONFIG, seed=5)


@pytest.fixture(scope="module")
def single(ckpt):
    llm = LLM(ckpt, single_process=True, **ENGINE_ARGS)
    yield llm
    llm.shutdown()


@pytest.fixture(scope="module", params=LAYOUTS, ids=lambda p: "A{}-R{}-G{}".format(*p))
def copy(request, ckpt):
    a, r, g = request.param
    llm = LLM(ckpt, attention_shards=a, routers=r, expert_groups=g, **ENGINE_ARGS)
    yield llm
    llm.shutdown()


def test_greedy_equals_single_process(copy: LLM, single: LLM, ckpt) -> None:
    ours = staggered_streams(copy, PROMPTS, GREEDY)  # requests join while the first decodes
    expected = [o.token_ids for o in single.generate(PROMPTS, GREEDY)]
    assert [tokens for tokens, _, _ in ours] == expected == reference_greedy(ckpt, PROMPTS, 12)
    texts = [copy.tokenizer.continuation(p, t) for p, t in zip(PROMPTS, expected, strict=True)]
    assert [text for _, text, _ in ours] == texts
    assert copy.stats()["blocks_in_use"] == 0


def test_seeded_sampling_equals_single_process(copy: LLM, single: LLM) -> None:
    ours = [o.token_ids for o in copy.generate(PROMPTS, SAMPLED)]
    assert ours == [o.token_ids for o in single.generate(PROMPTS, SAMPLED)]
    assert ours == [o.token_ids for o in copy.generate(PROMPTS, SAMPLED)]  # and across runs


def test_choices_and_cached_prefixes_equal_single_process(copy: LLM, single: LLM) -> None:
    """n choices (forked on the shard, with its block copies) and prefix-cache hits, every layout."""
    choices = SAMPLED.model_copy(update={"n": 3})
    assert [o.token_ids for o in copy.generate(PROMPTS[:2], choices)] == [
        o.token_ids for o in single.generate(PROMPTS[:2], choices)
    ]
    prefix = random_prompts(1, seed=77, low=24, high=24)[0]
    shared = [prefix + p[1:] for p in PROMPTS[:3]]
    first = copy.generate(shared[:1], GREEDY)[0]
    rest = copy.generate(shared[1:], GREEDY)
    assert all(o.cached_tokens >= 20 for o in rest)  # the prefix's blocks, on the shard that holds them
    assert [o.token_ids for o in [first, *rest]] == [o.token_ids for o in single.generate(shared, GREEDY)]
    assert copy.stats()["blocks_in_use"] == 0


def test_expert_counts_equal_single_process(copy: LLM, single: LLM) -> None:
    before_copy, before_single = copy.expert_token_counts(), single.expert_token_counts()
    copy.generate(PROMPTS[:2], GREEDY)
    single.generate(PROMPTS[:2], GREEDY)
    delta = copy.expert_token_counts() - before_copy
    assert delta.sum() > 0
    assert delta.tolist() == (single.expert_token_counts() - before_single).tolist()
    # The routers keep their own totals; together they are the engine's.
    routers = [
        a for a, s in zip(copy.backend.workers.actors, copy.backend.workers.specs, strict=True) if s.role == "router"
    ]
    kept = sum(ray.get([r.expert_counts.remote() for r in routers]))
    assert kept.tolist() == copy.expert_token_counts().tolist()


def test_each_worker_reads_and_holds_only_its_tensors(copy: LLM) -> None:
    backend = copy.backend
    loaded = backend.reports("loaded")
    for spec in backend.workers.specs:
        assert sorted(loaded[spec.name]["keys_read"]) == sorted(spec.weight_names(ENGINE_CONFIG)), spec.name
        assert loaded[spec.name]["param_bytes"] == param_bytes(ENGINE_CONFIG, spec, dtype_bytes=4), spec.name


def test_many_requests_under_a_small_block_budget(ckpt) -> None:
    prompts = random_prompts(96, seed=9, low=1, high=40)  # 3 x max_seqs, over 24 blocks of 4 tokens
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    with LLM(ckpt, attention_shards=2, routers=1, expert_groups=3, block_size=4, num_blocks=24,
             max_batched_tokens=64, max_seqs=32) as llm:  # fmt: skip
        outs = llm.generate(prompts, params)
        assert llm.engine.scheduler.num_preemptions > 0
        assert llm.stats()["blocks_in_use"] == 0
    assert [o.token_ids for o in outs] == reference_greedy(ckpt, prompts, 8)


def test_abort_frees_blocks_and_a_killed_worker_is_replaced_mid_request(ckpt) -> None:
    llm = LLM(ckpt, attention_shards=1, routers=1, expert_groups=2, **ENGINE_ARGS)
    long = SamplingParams(max_tokens=2000, temperature=0.0, ignore_eos=True)

    async def abort_after(n: int) -> dict[str, int]:
        stream = llm.stream(PROMPTS[0], long)
        async for out in stream:
            if len(out.token_ids) >= n:
                assert llm.stats()["blocks_in_use"] > 0
                break
        await stream.aclose()
        return llm.stats()

    assert idle(asyncio.run(abort_after(3))) == {"running": 0, "waiting": 0, "blocks_in_use": 0}

    # Kill an expert group while a request decodes: it is replaced, and the request completes unchanged.
    params = SamplingParams(max_tokens=120, temperature=0.0, ignore_eos=True)
    outputs: list = []
    thread = threading.Thread(target=lambda: outputs.extend(llm.generate([PROMPTS[1]], params)))
    thread.start()
    deadline = time.monotonic() + 30
    while llm.stats()["running"] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    old = llm.backend.reports("where")["experts-1"]["pid"]
    ray.kill(llm.backend.workers.actors[-1])
    thread.join(timeout=60)
    assert not thread.is_alive(), "the request hung after its worker died"
    assert outputs[0].token_ids == reference_greedy(ckpt, [PROMPTS[1]], 120)[0]
    assert llm.error is None and llm.backend.reports("where")["experts-1"]["pid"] != old
    assert [r["workers"] for r in llm.backend.recoveries] == ["experts-1"]
    llm.shutdown()


def test_a_worker_that_cannot_be_replaced_fails_its_requests_fast(ckpt, tmp_path) -> None:
    private = Path(shutil.copytree(ckpt, tmp_path / "ckpt"))
    llm = LLM(private, attention_shards=1, routers=1, expert_groups=2, **ENGINE_ARGS)
    long = SamplingParams(max_tokens=2000, temperature=0.0, ignore_eos=True)
    errors: list[BaseException] = []
    thread = threading.Thread(target=lambda: _capture(errors, lambda: llm.generate([PROMPTS[1]], long)))
    thread.start()
    deadline = time.monotonic() + 30
    while llm.stats()["running"] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    (private / "model.safetensors").rename(private / "hidden")  # the replacement finds no weights
    killed = time.monotonic()
    ray.kill(llm.backend.workers.actors[-1])
    thread.join(timeout=60)
    assert not thread.is_alive(), "the request hung after its worker died"
    assert time.monotonic() - killed < 30
    assert len(errors) == 1 and isinstance(errors[0], EngineError)
    assert "experts-1 died and could not be replaced" in str(errors[0]) and "safetensors" in str(errors[0])
    with pytest.raises(EngineError, match="cannot serve"):
        llm.generate([PROMPTS[2]], GREEDY)
    llm.shutdown()

    # The dead copy's resources are back: a new one starts and serves correctly.
    (private / "hidden").rename(private / "model.safetensors")
    with LLM(private, attention_shards=1, routers=1, expert_groups=2, **ENGINE_ARGS) as fresh:
        assert fresh.generate([PROMPTS[2]], GREEDY)[0].token_ids == reference_greedy(ckpt, [PROMPTS[2]], 12)[0]


def _capture(errors: list[BaseException], fn) -> None:
    try:
        fn()
    except BaseException as e:
        errors.append(e)


def test_gpu_plan_whose_weights_do_not_fit_is_refused_up_front(ckpt) -> None:
    from protocol.experts import PlacementError

    with pytest.raises(PlacementError, match=r"attention-0 needs 0\.0 GB of weights at 4 bytes per parameter"):
        LLM(ckpt, expert_groups=1, device="cuda", gpu_memory_gb=0.0001)
    assert not [pg for pg in ray.util.placement_group_table().values() if pg["state"] == "PENDING"]


def test_nccl_ranks_sharing_a_gpu_are_refused_before_any_actor_starts(ckpt) -> None:
    from protocol.experts import PlacementError

    groups = len(ray.util.placement_group_table())
    with pytest.raises(PlacementError, match=r"use cluster\.transport: gloo"):
        LLM(ckpt, expert_groups=2, device="cuda", worker_resources={"GPU": 0.25, "CPU": 1.0})
    assert len(ray.util.placement_group_table()) == groups  # nothing was reserved


POISON = 777  # a token whose embedding row is NaN in `poisoned_ckpt`


@pytest.fixture(scope="module")
def poisoned_ckpt(ckpt, tmp_path_factory) -> Path:
    return poisoned_copy(ckpt, tmp_path_factory.mktemp("poisoned"), POISON)


@pytest.mark.parametrize("layout", [None, (1, 1, 2)], ids=["single", "A1-R1-G2"])
def test_a_request_whose_sampling_fails_fails_alone(poisoned_ckpt: Path, ckpt, layout) -> None:
    """One request's logits are NaN (its prompt holds the poisoned token): its draw fails, and it
    alone ends, with a message; the other request of the same steps completes, equal to the
    reference, and the copy goes on serving."""
    keys = {"single_process": True} if layout is None else dict(zip(("attention_shards", "routers", "expert_groups"),
                                                                      layout, strict=True))  # fmt: skip
    sampled = SamplingParams(max_tokens=6, temperature=1.0, seed=5, ignore_eos=True)
    poisoned, fine = [1, 50, POISON, 60], PROMPTS[0]
    with LLM(poisoned_ckpt, **ENGINE_ARGS, **keys) as llm:

        async def both() -> list[object]:
            async def one(prompt: list[int], params: SamplingParams) -> object:
                try:
                    return [o async for o in llm.stream(prompt, params)][-1].token_ids
                except RequestFailed as e:
                    return e

            return list(await asyncio.gather(one(poisoned, sampled), one(fine, GREEDY)))

        failed, completed = asyncio.run(both())
        assert isinstance(failed, RequestFailed), failed
        assert "sampling failed" in str(failed) and "nan" in str(failed).lower()
        assert completed == reference_greedy(ckpt, [fine], 12)[0]
        assert llm.error is None and idle(llm.stats()) == {"running": 0, "waiting": 0, "blocks_in_use": 0}
        assert llm.generate([fine], GREEDY)[0].token_ids == completed  # still serving
        with pytest.raises(RequestFailed, match="sampling failed"):
            llm.generate([poisoned, fine], sampled)
