"""Next-token choice from logits: logit controls, greedy, temperature, min-p, top-k, top-p, seeded.

Shape legend: V = vocab, W = V / 32 words of an allowed-token bitmask. One function for one
sequence's row, so that the single-process path and the attention shards draw identically from a
per-request generator.

The order is vLLM's and OpenAI's: the row's controls first (`adjust`: logit bias, banned tokens,
the grammar's allowed tokens, repetition penalty, then presence and frequency penalties), then
greedy or temperature, min-p, top-k and top-p, then the draw.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what a torch generator's manual_seed takes
GREEDY_BELOW = 1e-5  # temperatures under this are greedy: logits / 1e-40 overflow to inf and NaN
LOGIT_BIAS_LIMIT = 100.0  # OpenAI's range for a token's bias: -100 bans it, +100 all but forces it


class DrawParams(BaseModel):
    """How to draw one token of a request from its logits (the request's other settings, its length
    and stopping rules, live with the engine's `SamplingParams`, which extends these)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    temperature: float = Field(default=1.0, ge=0.0)  # 0 (or below GREEDY_BELOW) = greedy
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)  # 0 = no top-k cut
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)  # drop tokens under min_p x the top token's probability
    seed: int | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX)  # reproducible draws per request when set
    # OpenAI's penalties over the tokens generated so far: logit -= count * frequency + (count > 0) * presence
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    # vLLM's (CTRL's) over the prompt's and the generated tokens: a positive logit / r, a negative one x r
    repetition_penalty: float = Field(default=1.0, gt=0.0)
    logit_bias: dict[int, float] = Field(default_factory=dict)  # token id -> added to its logit (-100..100)
    bad_token_ids: list[int] = Field(default_factory=list)  # never drawn (a tool call's token under tool_choice none)

    @field_validator("logit_bias")
    @classmethod
    def _bias_range(cls, v: dict[int, float]) -> dict[int, float]:
        bad = [t for t, b in v.items() if t < 0 or not -LOGIT_BIAS_LIMIT <= b <= LOGIT_BIAS_LIMIT]
        if bad:
            raise ValueError(f"logit_bias maps token ids >= 0 to -100..100; not {bad[:5]}")
        return v

    @field_validator("bad_token_ids")
    @classmethod
    def _ids(cls, v: list[int]) -> list[int]:
        if any(t < 0 for t in v):
            raise ValueError(f"bad_token_ids are token ids >= 0; not {[t for t in v if t < 0][:5]}")
        return v

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def adjusts(self) -> bool:
        """Whether drawing changes the logits before sampling them (`adjust`)."""
        return bool(self.logit_bias) or bool(self.bad_token_ids) or self.penalised

    @property
    def penalised(self) -> bool:
        """Whether drawing needs the tokens seen so far."""
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0


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


def allowed_tokens(bitmask: bytes, vocab: int, device: torch.device | str) -> torch.Tensor:
    """A grammar's allowed-token bitmask (little-endian 32-bit words, bit i of word w = token 32w + i;
    llguidance's layout) as a bool mask [V]; tokens past the mask's words are not allowed."""
    words = torch.frombuffer(bytearray(bitmask), dtype=torch.int32).to(device)  # [W]
    shifts = torch.arange(32, dtype=torch.int32, device=device)  # [32]
    bits = ((words[:, None] >> shifts) & 1).bool().flatten()  # [W * 32]
    allowed = torch.zeros(vocab, dtype=torch.bool, device=device)  # [V]
    n = min(vocab, bits.numel())
    allowed[:n] = bits[:n]
    return allowed


def adjust(
    logits: torch.Tensor,
    params: DrawParams,
    output: Sequence[int] = (),
    prompt: Sequence[int] = (),
    banned: Sequence[int] = (),
    allowed: torch.Tensor | None = None,
) -> torch.Tensor:
    """The row's controls applied to logits [V] (a new fp32 tensor): `params.logit_bias`, the
    `params.bad_token_ids` and `banned` token ids and the `allowed` mask [V] (a grammar's) to -inf,
    the repetition penalty over `prompt` + `output` token ids, then presence and frequency
    penalties over `output`'s."""
    logits = logits.float().clone()  # [V]
    vocab, device = logits.shape[-1], logits.device
    if params.logit_bias:
        ids = torch.tensor(list(params.logit_bias), dtype=torch.long, device=device)
        logits.index_add_(0, ids, torch.tensor(list(params.logit_bias.values()), device=device))
    if params.bad_token_ids or banned:
        never = torch.tensor([*params.bad_token_ids, *banned], dtype=torch.long, device=device)
        logits[never] = float("-inf")
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    if params.repetition_penalty != 1.0 and (output or prompt):
        seen = torch.zeros(vocab, dtype=torch.bool, device=device)  # [V]
        seen[torch.tensor([*prompt, *output], dtype=torch.long, device=device)] = True
        r = params.repetition_penalty
        logits = torch.where(seen, torch.where(logits > 0, logits / r, logits * r), logits)
    if (params.presence_penalty or params.frequency_penalty) and output:
        counts = torch.bincount(torch.tensor(list(output), dtype=torch.long, device=device), minlength=vocab)  # [V]
        logits -= counts[:vocab] * params.frequency_penalty + (counts[:vocab] > 0) * params.presence_penalty
    return logits


def sample(logits: torch.Tensor, params: DrawParams, generator: torch.Generator) -> int:
    """One token id from logits [V] (computed in fp32 whatever the model dtype)."""
    logits = logits.float()
    if params.greedy:
        return int(torch.argmax(logits))
    logits = logits / params.temperature  # [V]
    if params.min_p > 0.0:  # relative to the most likely token, after temperature (vLLM's)
        probs = torch.softmax(logits, dim=-1)  # [V]
        logits = logits.masked_fill(probs < params.min_p * probs.max(), float("-inf"))
    if 0 < params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)  # [V]
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)  # [V], [V]
        before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # mass strictly above each token
        drop = before >= params.top_p  # keep the smallest set reaching top_p
        drop[0] = False  # and the top token always: a top_p under fp32's range (1e-309) reads as 0
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))
