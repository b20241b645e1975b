"""What crosses between the ingress and a model copy (`LLMServer`): typed, plain data.

The ingress sends one `GenerateCall` per request; the copy's stream answers first a `Head`
(prompt size, which copy) or a `Failure`, then one `Update` per engine step, or a `Failure`
when the request ends in error midway.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator

from cluster.engine.request import SamplingParams
from cluster.serving.openai_protocol import APIError, ChatMessage, Tool, ToolChoice
from model.tokenizer import Tokenizer


class _Message(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class GenerateCall(_Message):
    id: str
    prompt: str | list[int] | None = None  # completions: text or token ids
    messages: list[ChatMessage] | None = None  # chat
    params: SamplingParams
    echo: bool = False  # the Head carries the prompt's text
    tools: list[Tool] | None = None  # chat: functions the model may call (encoded into the prompt)
    tool_choice: ToolChoice | None = None  # None: auto with tools
    parallel_tool_calls: bool = True

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
    prompt_text: str = ""  # with echo: the prompt as text (decoded, for a prompt of token ids)


class Logprob(_Message):
    """One position's token as OpenAI shows it, its logprob and the most likely alternatives."""

    token: str  # its text; "bytes:\\xe2" for a byte that is not text on its own; "token_id:N" without a tokenizer
    bytes: list[int]  # its UTF-8 bytes
    logprob: float | None  # None: the prompt's first token (nothing predicts it)
    top: list[tuple[str, list[int], float]] = []  # (token, bytes, logprob), most likely first


def token_text(tokenizer: Tokenizer | None, token_id: int) -> tuple[str, list[int]]:
    """How OpenAI shows one token of a `Logprob`: its text and UTF-8 bytes ("bytes:\\x.." for a lone
    byte that is not text, "token_id:N" for a model without a tokenizer)."""
    if tokenizer is None:
        return f"token_id:{token_id}", []
    raw = tokenizer.token_bytes(token_id)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
    return text, list(raw)


class ToolCallOut(_Message):
    """One call the model made, as OpenAI shows it: `arguments` is JSON text."""

    id: str  # 9 alphanumerics, as the Mistral format requires of the id sent back with the result
    name: str
    arguments: str

    def openai(self, index: int | None = None) -> dict[str, Any]:
        call = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return call if index is None else {"index": index} | call


class Update(_Message):
    index: int  # which of the request's n choices
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "tool_calls" once a choice's calls are parsed
    tool_calls: list[ToolCallOut] = []  # on the choice's last update, when its reply is tool calls
    logprobs: list[Logprob] = []  # the new tokens', when asked for
    prompt_logprobs: list[Logprob] | None = None  # once, on the first update after the prompt is scored
    cached_tokens: int = 0  # prompt tokens served from the prefix cache


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


class TokenizeCall(_Message):
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    tools: list[Tool] | None = None  # chat: encoded into the prompt as a chat request's are
    add_special_tokens: bool = True  # a bos in front of a text prompt (chat always has the format's own)

    @model_validator(mode="after")
    def _one_source(self) -> TokenizeCall:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("tokenize takes either a prompt or chat messages")
        return self
