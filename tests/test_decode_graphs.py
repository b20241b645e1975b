"""Decode steps at fixed shapes (`model/decode_graphs.py`): what a CUDA graph records, run as it
is here, against the model's own forward: the same logits and expert counts for padded batches,
a sliding window and blocks past the window, and an engine that steps through them generating
what the reference does. The recording itself needs a GPU: tests/test_gpu.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from cluster.backend.local_backend import LocalBackend
from cluster.engine.core import Engine
from cluster.engine.request import SamplingParams
from model.decode_graphs import DecodeGraphs
from model.kernels import CudaKernels, TorchKernels
from model.kv_cache import CacheBatch, KVCache
from model.loader import load_model
from model.tokenizer import Tokenizer
from protocol.config import LLMConfig
from tests.support.common import ENGINE_CONFIG, random_prompts, reference_greedy

pytestmark = pytest.mark.unit

BLOCK = 4
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def ckpt(checkpoint_factory: Any) -> Path:
    return checkpoint_factory(ENGINE_CONFIG, seed=11)  # sliding window 12: decode keys start past 0


@pytest.mark.parametrize("kernels", [TorchKernels(), CudaKernels()], ids=["torch", "cuda"])
def test_fixed_shape_decode_steps_equal_the_models_forward(ckpt: Path, kernels: TorchKernels) -> None:
    model = load_model(ckpt, device=DEVICE, kernels=kernels)
    cfg = model.config
    prompts = [[1, *range(5, 5 + n)] for n in (3, 17, 9)]  # one of them past the window
    blocks = 40
    caches = [KVCache.allocate(cfg, blocks + 1, BLOCK, torch.float32, DEVICE) for _ in range(2)]  # + a scratch block
    graphs = DecodeGraphs(model, caches[1], max_model_len=64, max_seqs=8, capture=False, sizes=(1, 2, 4, 8))
    tables = [list(range(i * 12, i * 12 + 12)) for i in range(3)]  # 12 blocks (48 positions) each
    with torch.inference_mode():
        for cache in caches:  # the same prefill in both caches
            tokens = torch.tensor([t for p in prompts for t in p], device=DEVICE)
            positions = torch.tensor([i for p in prompts for i in range(len(p))])  # on the host, as `pack` leaves them
            last = model(tokens, positions, [len(p) for p in prompts], CacheBatch(cache, tables))
        nxt = last[torch.tensor([len(p) for p in prompts], device=DEVICE).cumsum(0) - 1].argmax(-1).tolist()
        lens = [len(p) for p in prompts]
        for step in range(6):
            live = [0, 1, 2] if step < 4 else [1]  # 3 sequences padded to 4, then one alone
            toks, pos = [nxt[i] for i in live], [lens[i] for i in live]
            counts = torch.zeros(cfg.num_layers, cfg.num_experts, dtype=torch.long, device=DEVICE)
            want = model(torch.tensor(toks, device=DEVICE), torch.tensor(pos), [1] * len(live),
                         CacheBatch(caches[0], [tables[i] for i in live]), expert_counts=counts)  # fmt: skip
            got, got_counts = graphs.step(toks, pos, [tables[i] for i in live])
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            assert torch.equal(got_counts, counts)  # the padding rows count nothing
            for i, t in zip(live, want.argmax(-1).tolist(), strict=True):
                nxt[i], lens[i] = t, lens[i] + 1
    assert graphs.sizes == [1, 2, 4, 8]


def test_an_engine_stepping_through_fixed_shape_decodes_generates_the_reference(ckpt: Path) -> None:
    """Prefill eager, decode at fixed shapes, requests joining and leaving: the reference's tokens."""
    prompts = random_prompts(5, seed=8, low=2, high=30)
    config = LLMConfig.from_keywords(checkpoint=ckpt, block_size=BLOCK, num_blocks=64, max_batched_tokens=32,
                                     max_seqs=4, max_model_len=128)  # fmt: skip
    model = load_model(ckpt)
    backend = LocalBackend(model, 64, config.engine, decode_graphs=True)
    assert backend.graphs is not None and backend.shard.cache.num_blocks == 65  # the scratch block on top
    steps: list[int] = []
    real_step = backend.graphs.step

    def counted(*args: Any) -> Any:
        steps.append(len(args[0]))
        return real_step(*args)

    backend.graphs.step = counted  # type: ignore[method-assign]
    engine = Engine(backend, model.config, Tokenizer.for_checkpoint(ckpt, model.config.vocab_size), config, 64)
    greedy = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), engine.check_request(p, greedy))
    done: dict[str, list[int]] = {}
    while engine.has_work:
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.token_ids
    assert [done[str(i)] for i in range(len(prompts))] == reference_greedy(ckpt, prompts, 10)
    assert steps and max(steps) == 4  # decode steps went through the fixed shapes, at most max_seqs at once
