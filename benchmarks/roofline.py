"""The memory-bandwidth floor of a decode step, and how close the single-process engine comes.

At batch 1 a decode step must read, once: every layer's attention weights and norms, the gate,
the K experts the token is routed to (3 matrices each), the final norm and lm_head (plus one
embedding row). Those bytes over the machine's bandwidth (a large tensor copy, timed here) is the
floor no implementation can beat; the measured step over that floor is the efficiency figure.
"""

from __future__ import annotations

import statistics
import time

import torch

from cluster.engine import SamplingParams
from cluster.llm import LLM
from model.config import ModelConfig


def decode_bytes(config: ModelConfig, itemsize: int) -> int:
    """Weight bytes one token's decode step reads at batch 1."""
    h, q, kv = config.hidden_size, config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    attention = h * q + 2 * h * kv + q * h + 2 * h  # wq, wk, wv, wo, two norms
    experts = config.experts_per_token * 3 * h * config.intermediate_size
    gate = config.num_experts * h
    per_layer = attention + experts + gate
    head = config.vocab_size * h + h + h  # lm_head, final norm, one embedding row
    return itemsize * (config.num_layers * per_layer + head)


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
    llm.generate([prompt[:8]], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))  # warm-up
    llm.profile(True)
    llm.generate([prompt], SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True))
    records = llm.step_profile()["engine"]
    llm.profile(False)
    return 1000 * statistics.median(r["wall"] for r in records if r["decode"])
