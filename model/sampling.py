"""Next-token choice from logits: greedy, temperature, top-k, top-p, seeded.

Shape legend: V = vocab. One function for one sequence's row, so that the single-process path
and the attention shards draw identically from a per-request generator.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what a torch generator's manual_seed takes
GREEDY_BELOW = 1e-5  # temperatures under this are greedy: logits / 1e-40 overflow to inf and NaN


class SamplingParams(BaseModel):
    """How to pick tokens for one request."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_tokens: int = Field(default=16, gt=0)
    temperature: float = Field(default=1.0, ge=0.0)  # 0 (or below GREEDY_BELOW) = greedy
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)  # 0 = no top-k cut
    seed: int | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX)  # reproducible draws per request when set

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A per-request generator on the device of the logits it will draw from (a CUDA draw needs a
    CUDA generator): seeded when asked, else from fresh entropy. The same seed draws the same
    tokens on the same kind of device; CPU and CUDA streams differ."""
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """One token id from logits [V] (computed in fp32 whatever the model dtype)."""
    logits = logits.float()
    if params.greedy:
        return int(torch.argmax(logits))
    logits = logits / params.temperature  # [V]
    if 0 < params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)  # [V]
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)  # [V], [V]
        before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # mass strictly above each token
        sorted_probs = sorted_probs.masked_fill(before >= params.top_p, 0.0)  # keep the smallest set reaching top_p
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))
