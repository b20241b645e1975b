"""What a request is to the engine: its settings (`SamplingParams`), what each of its choices has
produced after a step (`RequestOutput`), and how it fails (`RequestError`: it can never run;
`RequestFailed`: it failed while running). Every layer above the engine speaks these."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from pydantic import Field

from cluster.engine.structured import StructuredOutput
from model.sampling import DrawParams
from protocol.step import MAX_TOP_LOGPROBS, TokenLogprobs

FinishReason = Literal["stop", "length", "abort"]


class SamplingParams(DrawParams):
    """Per-request generation settings: how to draw a token (`DrawParams`, what a shard gets) plus the
    length, choices, logprobs, stopping rules and grammar, which stay with the engine."""

    max_tokens: int = Field(default=16, ge=0)  # 0: score the prompt only (needs prompt_logprobs)
    n: int = Field(default=1, ge=1)  # choices, sharing the prompt's KV blocks; choice i draws with seed + i
    stop: list[str] = Field(default_factory=list)  # stop strings; the text ends before the first match
    stop_token_ids: list[int] = Field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)  # per sampled token, + alternatives
    prompt_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)  # per prompt token (not the first)
    min_tokens: int = Field(default=0, ge=0)  # no eos, stop token or stop string before this many tokens (vLLM's)
    structured: StructuredOutput | None = None  # the output must match this grammar (compiled by the caller)

    def draw_params(self) -> DrawParams:
        """What a shard needs to draw (stop rules and the grammar stay here)."""
        return DrawParams(**self.model_dump(include=set(DrawParams.model_fields)))


@dataclass(frozen=True)
class CheckedRequest:
    """A prompt and settings the engine has found it can run: `Engine.check_request` makes them, the
    one place a request is checked, and `Engine.add_request` takes nothing else."""

    prompt: list[int]
    params: SamplingParams


class RequestFailed(RuntimeError):
    """One request failed while it ran (its sampling, its detokenising); the engine goes on."""


class RequestError(ValueError):
    """A request that can never run. `param` is the OpenAI request field that makes it so
    (`prompt`, `max_tokens`, ...), `code` the OpenAI error code."""

    def __init__(self, message: str, param: str | None = None, code: str = "invalid_value") -> None:
        super().__init__(message)
        self.message, self.param, self.code = message, param, code

    def __reduce__(self) -> tuple[type[RequestError], tuple[str, str | None, str]]:
        return RequestError, (self.message, self.param, self.code)  # picklable across Ray


@dataclass
class RequestOutput:
    """One choice of a request after a step: what is new since the last update and everything so far."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    new_token_ids: list[int]
    new_text: str
    finished: bool = False  # this choice is done
    finish_reason: FinishReason | None = None
    logprobs: list[TokenLogprobs] | None = None  # per token so far, when asked for
    error: str | None = None  # the choice ended in error: its own (a RequestFailed) or the engine's
    engine_failed: bool = False  # the error is the engine's: it cannot serve any more
    index: int = 0  # which of the request's `n` choices
    request_finished: bool = False  # every choice of the request is done: its last update
    prompt_logprobs: list[TokenLogprobs | None] | None = None  # once every prompt position is scored (the first: None)
    cached_tokens: int = 0  # prompt tokens served from the prefix cache


def check_token_ids(ids: Iterable[int], vocab_size: int, param: str) -> None:
    """`RequestError` naming `param` when any of `ids` is outside the vocabulary."""
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise RequestError(f"{param}: token ids {bad[:5]} are outside the vocabulary (0..{vocab_size - 1})", param)
