"""Offline throughput, side by side on the same weights and prompts: transformers' batched
`generate` (padded), our single-process engine, and our cluster in local mode.

Every system generates exactly `new_tokens` greedy tokens per prompt (end-of-sequence ignored),
so the outputs can be compared token for token and tokens/s means the same thing for all three.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from cluster.engine.request import SamplingParams
from cluster.llm import LLM

logger = logging.getLogger(__name__)
T = TypeVar("T")


def on_own_thread(fn: Callable[[], T]) -> T:
    """Run `fn` on a fresh thread that ends with it, and return its result.

    Each thread that runs parallel torch ops owns an OpenMP pool for as long as it lives, and
    with more pool threads than cores libgomp stops its workers spinning between ops, slowing
    every system measured after it (the single-process engine computes on its own loop thread).
    So tensor work in this process that is not the engine's runs on a thread that is gone after."""
    result: concurrent.futures.Future[T] = concurrent.futures.Future()

    def target() -> None:
        try:
            result.set_result(fn())
        except BaseException as e:
            result.set_exception(e)

    thread = threading.Thread(target=target, name="bench-own-thread")
    thread.start()
    thread.join()
    return result.result()


@dataclass
class Run:
    seconds: float  # the best of the repeats
    outputs: list[list[int]]  # generated token ids per prompt
    prefill_seconds: float | None = None  # transformers: the padded batch's prefill alone

    def tokens_per_s(self) -> float:
        return sum(len(o) for o in self.outputs) / self.seconds


def greedy(new_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)


def run_engine(llm: LLM, prompts: list[list[int]], new_tokens: int, repeats: int = 1) -> Run:
    """Our engine (either backend), after a short warm-up; the best of `repeats` runs."""
    llm.generate([prompts[0][:8]], greedy(2))
    best, outputs = float("inf"), []
    for _ in range(repeats):
        start = time.perf_counter()
        outs = llm.generate(prompts, greedy(new_tokens))
        best = min(best, time.perf_counter() - start)
        outputs = [o.token_ids for o in outs]
    return Run(best, outputs)


def run_hf(
    checkpoint: Path, prompts: list[list[int]], new_tokens: int, dtype: torch.dtype, device: str, repeats: int = 1
) -> Run:
    """transformers' `MixtralForCausalLM.generate`, all prompts in one left-padded batch; best of `repeats`.

    The same batch with one new token is timed too: the padded prefill's share of the run."""
    from transformers import GenerationConfig, MixtralForCausalLM

    model: Any = MixtralForCausalLM.from_pretrained(str(checkpoint), dtype=dtype)
    model = model.to(device).eval()
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)  # [B, P] left-padded with 0
    mask = torch.zeros(len(prompts), width, dtype=torch.long)  # [B, P]
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    make: Any = GenerationConfig
    cfg = make(max_new_tokens=new_tokens, do_sample=False, pad_token_id=0, eos_token_id=None)  # no early stop
    one = make(max_new_tokens=1, do_sample=False, pad_token_id=0, eos_token_id=None)
    ids, mask = ids.to(device), mask.to(device)
    with torch.inference_mode():
        start = time.perf_counter()
        model.generate(ids, attention_mask=mask, generation_config=one)  # also the warm-up
        prefill = time.perf_counter() - start
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            out = model.generate(ids, attention_mask=mask, generation_config=cfg)  # [B, P+N]
            best = min(best, time.perf_counter() - start)
    return Run(best, [row.tolist() for row in out[:, width:].cpu()], prefill_seconds=prefill)


def agreement(reference: list[list[int]], other: list[list[int]]) -> dict[str, float | int]:
    """How far two systems' greedy outputs agree: identical prompts, and the mean agreeing prefix."""
    same = sum(a == b for a, b in zip(reference, other, strict=True))
    prefix = [_common_prefix(a, b) / max(len(a), 1) for a, b in zip(reference, other, strict=True)]
    return {"identical": same, "prompts": len(reference), "mean_prefix_share": sum(prefix) / len(prefix)}


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
