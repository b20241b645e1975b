"""On a GPU (marker `gpu`, skipped without CUDA): the single-process engine and the cluster's CUDA path.

On the GPU machine (../shared/gpu/README.md):  python3 -m pytest -q -m gpu tests/test_gpu.py

- the model on CUDA against transformers on CUDA, on the torch and the cuda kernels: fp32 logits
  (< 1e-4), bf16 argmax agreement (tests/test_cuda_kernels.py checks the cuda kernels one by one);
- the engine on CUDA: greedy = transformers, seeded sampling reproducible (the draw that used to
  kill the engine), one failing request failing alone, preemption and a sliding window; decode
  steps replayed from CUDA graphs equal to the same steps run eagerly;
- the cluster on the one GPU with transport gloo (workers sharing it): layouts (1,1,2), (2,1,3),
  (2,2,8) give in fp32 the single-process engine's and transformers' greedy tokens, in bf16 the
  single-process engine's, seeded sampling reproducible; a worker killed under load through the
  Serve app fails its requests with 503 and the copy is replaced.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
import torch
from ray import serve
from transformers import MixtralForCausalLM

from cluster.engine.request import RequestFailed, SamplingParams
from cluster.llm import LLM
from model import generate, load_model
from tests.support.common import ENGINE_CONFIG, grid_config, poisoned_copy, random_prompts
from tests.support.serving import PROMPT, Load, census, census_back, serving, wait_until_serving

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

CUDA = "cuda"
GREEDY = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
SAMPLED = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=1234, ignore_eos=True)
PROMPTS = random_prompts(6, seed=21, low=2, high=40)
LAYOUTS = [(1, 1, 2), (2, 1, 3), (2, 2, 8)]
ENGINE: dict[str, Any] = {"block_size": 4, "num_blocks": 256, "max_batched_tokens": 64}


def one_gpu(a: int, r: int, g: int) -> dict[str, Any]:
    """A whole copy on this one GPU: fractional GPU bundles and the gloo data plane."""
    share = 1.0 / (a + r + g)
    return {"attention_shards": a, "routers": r, "expert_groups": g, "device": CUDA, "transport": "gloo",
            "worker_resources": {"GPU": share, "CPU": 1.0}}  # fmt: skip


def hf_greedy(path: Path, prompts: list[list[int]], n: int, dtype: torch.dtype = torch.float32) -> list[list[int]]:
    hf = MixtralForCausalLM.from_pretrained(path, dtype=dtype).to(CUDA).eval()
    out = []
    for p in prompts:
        ids = hf.generate(torch.tensor([p], device=CUDA), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                          pad_token_id=0)  # fmt: skip
        out.append(ids[0, len(p) :].tolist())
    return out


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Mean share of each continuation's tokens before the first disagreement."""
    shares = []
    for x, y in zip(a, b, strict=True):
        same = next((i for i, (s, t) in enumerate(zip(x, y, strict=False)) if s != t), min(len(x), len(y)))
        shares.append(same / max(len(x), 1))
    return sum(shares) / len(shares)


@pytest.fixture(scope="module")
def ckpt(checkpoint_factory: Any) -> Path:
    return checkpoint_factory(ENGINE_CONFIG, seed=5)


# ---- the model and the single-process engine on CUDA (the GPU-engine issue) --------------------


@pytest.mark.parametrize("kernels", ["torch", "cuda"])
def test_logits_equal_transformers_on_cuda(checkpoint_factory: Any, kernels: str) -> None:
    path = checkpoint_factory(grid_config(sliding_window=6), seed=3)
    lengths = [9, 1, 23, 16]
    gen = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, 512, (n,), generator=gen) for n in lengths]
    tokens, positions = torch.cat(seqs).to(CUDA), torch.cat([torch.arange(n) for n in lengths]).to(CUDA)
    for dtype in (torch.float32, torch.bfloat16):
        ours = load_model(path, dtype=dtype, device=CUDA, kernels=kernels)  # type: ignore[arg-type]
        hf = MixtralForCausalLM.from_pretrained(path, dtype=dtype).to(CUDA).eval()
        with torch.no_grad():
            got = ours(tokens, positions, lengths).float()
            want = torch.cat([hf(s[None].to(CUDA)).logits[0] for s in seqs]).float()
        if dtype == torch.float32:
            assert (got - want).abs().max().item() < 1e-4
        else:
            assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.9


@pytest.mark.parametrize("kernels", ["torch", "cuda"])
def test_greedy_engine_equals_transformers_on_cuda(ckpt: Path, kernels: str) -> None:
    with LLM(ckpt, single_process=True, device=CUDA, kernels=kernels, **ENGINE) as llm:
        ours = [o.token_ids for o in llm.generate(PROMPTS, GREEDY)]
    assert ours == hf_greedy(ckpt, PROMPTS, 16)


def test_sampled_requests_on_cuda_are_reproducible_and_a_failing_one_fails_alone(ckpt: Path, tmp_path: Path) -> None:
    with LLM(ckpt, single_process=True, device=CUDA, **ENGINE) as llm:
        first = [o.token_ids for o in llm.generate(PROMPTS, SAMPLED)]  # a CPU generator here killed the engine
        assert [o.token_ids for o in llm.generate(PROMPTS, SAMPLED)] == first
        other = [o.token_ids for o in llm.generate(PROMPTS, SAMPLED.model_copy(update={"seed": 99}))]
        assert other != first
    with LLM(poisoned_copy(ckpt, tmp_path, 777), single_process=True, device=CUDA, **ENGINE) as llm:
        with pytest.raises(RequestFailed, match="sampling failed"):
            llm.generate([[1, 50, 777, 60], PROMPTS[0]], SAMPLED)
        assert llm.generate(PROMPTS[:1], GREEDY)[0].token_ids and llm.error is None


def test_preemption_and_a_sliding_window_on_cuda(ckpt: Path) -> None:
    prompts = random_prompts(60, seed=9, low=1, high=40)
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    model = load_model(ckpt, device=CUDA)
    reference = generate(model, prompts, params.draw_params(), params.max_tokens, eos_id=None)
    with LLM(ckpt, single_process=True, device=CUDA, block_size=4, num_blocks=24, max_batched_tokens=64,
             max_seqs=32) as llm:  # fmt: skip
        outs = llm.generate(prompts, params)
        assert llm.engine.scheduler.num_preemptions > 0
        assert llm.stats()["blocks_in_use"] == 0
    assert [o.token_ids for o in outs] == reference


def test_decode_steps_replayed_from_cuda_graphs_equal_the_same_steps_run_eagerly(ckpt: Path) -> None:
    """bf16 on the cuda kernels: each recorded size's replay equals the step run as it is."""
    from model.decode_graphs import DecodeGraphs
    from model.kv_cache import KVCache

    model = load_model(ckpt, dtype=torch.bfloat16, device=CUDA, kernels="cuda")
    caches = [KVCache.allocate(model.config, 65, 4, torch.bfloat16, CUDA) for _ in range(2)]
    recorded = DecodeGraphs(model, caches[0], max_model_len=128, max_seqs=8, capture=True, sizes=(1, 2, 4, 8))
    eager = DecodeGraphs(model, caches[1], max_model_len=128, max_seqs=8, capture=False, sizes=(1, 2, 4, 8))
    tables = [list(range(i * 16, i * 16 + 16)) for i in range(3)]
    tokens = [5, 9, 700]
    for step in range(12):  # prompts fed one token a step: keys grow past the window, sizes 4 then 1
        live = [0, 1, 2] if step < 8 else [2]
        args = ([tokens[i] for i in live], [step] * len(live), [tables[i] for i in live])
        got, got_counts = recorded.step(*args)
        want, want_counts = eager.step(*args)
        torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)
        assert torch.equal(got_counts, want_counts)
        for i, t in zip(live, want.argmax(-1).tolist(), strict=True):
            tokens[i] = t


def test_the_bf16_engine_on_cuda_graphs_agrees_with_the_eager_torch_kernels(ckpt: Path) -> None:
    outs = {}
    for kernels in ("torch", "cuda"):  # cuda: decode steps replayed from CUDA graphs
        with LLM(ckpt, single_process=True, device=CUDA, dtype="bfloat16", kernels=kernels, **ENGINE) as llm:
            assert (llm.engine.backend.graphs is not None) == (kernels == "cuda")  # type: ignore[attr-defined]
            outs[kernels] = [o.token_ids for o in llm.generate(PROMPTS, GREEDY)]
    assert agreement(outs["cuda"], outs["torch"]) > 0.9


# ---- the cluster on one GPU with transport gloo (the cluster's CUDA-path issue) ---------------


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    ray.shutdown()  # the shared local Ray (tests.support.common.local_ray), if a module before started it
    ray.init(num_cpus=32, num_gpus=1, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def single_cuda(ckpt: Path) -> dict[str, list[list[int]]]:
    out = {}
    for dtype in ("float32", "bfloat16"):
        with LLM(ckpt, single_process=True, device=CUDA, dtype=dtype, **ENGINE) as llm:
            out[dtype] = [o.token_ids for o in llm.generate(PROMPTS, GREEDY)]
    return out


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda p: "A{}-R{}-G{}".format(*p))
def test_cluster_on_one_gpu_equals_the_single_process_engine(
    local_ray: None, ckpt: Path, single_cuda: dict[str, list[list[int]]], layout: tuple[int, int, int]
) -> None:
    with LLM(ckpt, **one_gpu(*layout), **ENGINE) as llm:
        settings = llm.backend.reports("settings")
        assert {s["device"] for s in settings.values()} == {CUDA}
        assert {s["transport"] for s in settings.values()} == {"gloo"}
        fp32 = [o.token_ids for o in llm.generate(PROMPTS, GREEDY)]
        sampled = [o.token_ids for o in llm.generate(PROMPTS, SAMPLED)]
        assert [o.token_ids for o in llm.generate(PROMPTS, SAMPLED)] == sampled
    assert fp32 == single_cuda["float32"] == hf_greedy(ckpt, PROMPTS, 16)
    with LLM(ckpt, **one_gpu(*layout), dtype="bfloat16", **ENGINE) as llm:
        bf16 = [o.token_ids for o in llm.generate(PROMPTS, GREEDY)]
    assert [t[0] for t in bf16] == [t[0] for t in single_cuda["bfloat16"]]
    assert agreement(bf16, single_cuda["bfloat16"]) > 0.8


def test_a_request_failing_on_the_gpu_cluster_fails_alone(local_ray: None, ckpt: Path, tmp_path: Path) -> None:
    with LLM(poisoned_copy(ckpt, tmp_path, 777), **one_gpu(1, 1, 2), **ENGINE) as llm:
        with pytest.raises(RequestFailed, match="sampling failed"):
            llm.generate([[1, 50, 777, 60], PROMPTS[0]], SAMPLED)
        assert llm.generate(PROMPTS[:1], GREEDY)[0].token_ids
        assert llm.error is None


def test_killing_a_gpu_worker_fails_its_requests_and_the_copy_is_replaced(ckpt: Path) -> None:
    cluster = one_gpu(1, 1, 2) | {"device": CUDA}
    with serving(ckpt, cluster=cluster, serving={"health_check_period_s": 1, "retry_after_s": 3}) as s:
        with LLM(ckpt, single_process=True, device=CUDA) as llm:
            expected = llm.generate([PROMPT], SamplingParams(max_tokens=8, temperature=0.0))[0].text
        url = s["url"]
        wait_until_serving(url, expected)
        before = census()
        handle = serve.get_deployment_handle("LLMServer", app_name="mixtral")
        victim = next(w for w in handle.workers.remote().result() if w["name"].startswith("experts"))
        with Load(url) as load:
            time.sleep(2.0)
            killed = time.monotonic()
            os.kill(victim["pid"], signal.SIGKILL)
            time.sleep(6.0)
        in_flight = [r for r in load.records if r["start"] < killed <= r["end"]]
        assert in_flight and all(r["end"] - killed < 5.0 for r in in_flight)
        assert all(r["outcome"] in ("503", "error-event") for r in in_flight), in_flight
        wait_until_serving(url, expected)
        assert census_back(before) == before
