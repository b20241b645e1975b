"""The memory-bandwidth floor of a decode step, and how close the single-process engine comes.

At batch 1 a decode step must read, once: every layer's attention weights and norms, the gate,
the K experts the token is routed to (3 matrices each), the final norm and lm_head (plus one
embedding row). Those bytes over the machine's bandwidth (a large tensor copy, timed here) is the
floor no implementation can beat; the measured step over that floor is the efficiency figure.

The copy bandwidth of this project's VMs is not steady: it runs at ~47 or ~80 GB/s for seconds
at a time, whatever the process does (checked with fresh processes, huge pages on and off). So
`paired_rounds` alternates a bandwidth sample with a short decode measurement, and each step
time is compared with the floor of the moment it ran in; the figure against the best bandwidth
of the whole run is reported beside it.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from cluster.engine.request import SamplingParams
from cluster.llm import LLM
from model.config import ModelConfig


def experts_read(config: ModelConfig, batch: int) -> float:
    """Expected distinct experts a layer reads for `batch` tokens, each routed to K of E uniformly:
    E * (1 - (1 - K/E)^batch); K at batch 1, nearly all E at 32 tokens of Mixtral."""
    e, k = config.num_experts, config.experts_per_token
    return e * (1 - (1 - k / e) ** batch)


def decode_bytes(config: ModelConfig, itemsize: int, batch: int = 1) -> int:
    """Weight bytes a decode step of `batch` sequences reads (each expert once, however many of
    the batch's tokens it takes; the KV cache is left out: at these lengths it is < 1% of it)."""
    h, q, kv = config.hidden_size, config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    attention = h * q + 2 * h * kv + q * h + 2 * h  # wq, wk, wv, wo, two norms
    experts = experts_read(config, batch) * 3 * h * config.intermediate_size
    gate = config.num_experts * h
    per_layer = attention + experts + gate
    head = config.vocab_size * h + h + h  # lm_head, final norm, one embedding row
    return int(itemsize * (config.num_layers * per_layer + head))


def memory_bandwidth(nbytes: int = 1 << 29, device: str = "cpu", repeats: int = 5) -> float:
    """Bytes per second of a large tensor copy (read + write), best of `repeats`."""
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        dst.copy_(src)
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() * 4 / best


def batch1_decode_ms(llm: LLM, prompt: list[int], new_tokens: int) -> float:
    """Median milliseconds of a decode step with one sequence."""
    return decode_step_ms(llm, [prompt], new_tokens)


def decode_step_ms(llm: LLM, prompts: list[list[int]], new_tokens: int) -> float:
    """Median milliseconds of a decode step with all of `prompts` decoding (one step holds them all)."""
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    llm.generate([p[:8] for p in prompts], params.model_copy(update={"max_tokens": 4}))  # warm-up
    llm.profile(True)
    llm.generate(prompts, params)
    records = llm.step_profile()["engine"]
    llm.profile(False)
    full = [r["wall"] for r in records if r["decode"] and r["seqs"] == len(prompts)]
    return 1000 * statistics.median(full or [r["wall"] for r in records if r["decode"]])


def batched_decode(
    llm: LLM, prompts: list[list[int]], config: ModelConfig, itemsize: int, bandwidth: float, new_tokens: int
) -> dict[str, Any]:
    """A decode step of len(prompts) sequences against the floor of the weights it reads."""
    nbytes = decode_bytes(config, itemsize, len(prompts))
    ms = decode_step_ms(llm, prompts, new_tokens)
    floor = 1000 * nbytes / bandwidth
    return {"batch": len(prompts), "experts_read": experts_read(config, len(prompts)), "bytes_per_step": nbytes,
            "bandwidth_gb_s": bandwidth / 1e9, "floor_ms": floor, "step_ms": ms, "ratio": ms / floor}  # fmt: skip


def paired_rounds(
    llm: LLM, prompt: list[int], nbytes: int, bandwidth: Callable[[], float], rounds: int, new_tokens: int
) -> dict[str, Any]:
    """`rounds` x (bandwidth sample, then the median batch-1 decode step right after it).

    ratio: median over rounds of step / floor-at-that-moment; ratio_vs_best: the median step
    over the floor at the best bandwidth seen in any round (the stricter reading)."""
    pairs = []
    for _ in range(rounds):
        bw = bandwidth()
        ms = batch1_decode_ms(llm, prompt, new_tokens)
        pairs.append({"bandwidth_gb_s": bw / 1e9, "step_ms": ms, "ratio": ms / (1000 * nbytes / bw)})
    best = max(p["bandwidth_gb_s"] for p in pairs) * 1e9
    measured = statistics.median(p["step_ms"] for p in pairs)
    floor = 1000 * nbytes / best
    return {
        "bytes_per_step": nbytes,
        "rounds": pairs,
        "ratio": statistics.median(p["ratio"] for p in pairs),
        "bandwidth_gb_s": best / 1e9,
        "floor_ms": floor,
        "measured_ms": measured,
        "ratio_vs_best": measured / floor,
    }
