"""What crosses between the ingress and a model copy (`LLMServer`): typed, plain data.

The ingress sends one `GenerateCall` per request; the copy's stream answers first a `Head`
(prompt size, which copy) or a `Failure`, then one `Update` per engine step, or a `Failure`
when the request ends in error midway.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, model_validator

from cluster.engine import SamplingParams
from cluster.openai_protocol import APIError, ChatMessage


class _Message(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class GenerateCall(_Message):
    id: str
    prompt: str | list[int] | None = None  # completions: text or token ids
    messages: list[ChatMessage] | None = None  # chat
    params: SamplingParams

    @model_validator(mode="after")
    def _one_source(self) -> GenerateCall:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("a call carries either a prompt or chat messages")
        return self

    @property
    def chat(self) -> bool:
        return self.messages is not None


class Head(_Message):
    prompt_tokens: int
    replica: str


class Update(_Message):
    text: str
    token_ids: list[int]
    finish_reason: str | None
    logprobs: list[float]


class Failure(_Message):
    status: int
    message: str
    param: str | None = None
    code: str | None = None

    @classmethod
    def of(cls, e: APIError) -> Failure:
        return cls(status=e.status, message=e.message, param=e.param, code=e.code)

    def error(self) -> APIError:
        return APIError(self.status, self.message, self.param, self.code)
