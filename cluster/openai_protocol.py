"""OpenAI-compatible request bodies and error responses.

Requests are validated with pydantic; any failure becomes a 400 whose body names the field:
`{"error": {"message": ..., "type": "invalid_request_error", "param": "temperature", "code": ...}}`.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cluster.engine import SamplingParams
from model.sampling import SEED_MAX, SEED_MIN
from protocol.step import MAX_TOP_LOGPROBS

_TYPE_TAG = re.compile(r"^(str|int|float|bool|list|dict|none|[a-z-]+\[.*\])$")


class FieldError(ValueError):
    """A rule across fields, raised by a model validator, that still names the field to blame."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class _Request(BaseModel):
    # Unknown fields are tolerated (clients send many); types of known fields are strict.
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str
    max_tokens: int | None = Field(default=None, ge=0)  # 0 only to echo a prompt (completions)
    max_completion_tokens: int | None = Field(default=None, gt=0)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)  # extension
    n: int = Field(default=1, ge=1)  # choices per prompt; the server's engine.max_n caps it
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX)
    user: str | None = None

    @field_validator("temperature", "top_p", mode="before")
    @classmethod
    def _int_is_a_float(cls, v: Any) -> Any:
        return float(v) if isinstance(v, int) and not isinstance(v, bool) else v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        stops = [v] if isinstance(v, str) else v or []
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop must be at most 4 non-empty strings")
        return v

    def _sampling(self, default_max_tokens: int, **extra: Any) -> SamplingParams:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        max_tokens = self.max_completion_tokens or self.max_tokens
        return SamplingParams(
            max_tokens=default_max_tokens if max_tokens is None else max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            seed=self.seed,
            stop=stops,
            n=self.n,
            **extra,
        )

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionRequest(_Request):
    prompt: str | list[int] | list[str] | list[list[int]]  # one prompt, or a batch of them
    echo: bool = False  # the prompt in front of the completion (and its logprobs, with logprobs)
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)  # alternatives per position

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, v: str | list[int] | list[str] | list[list[int]]) -> Any:
        if len(v) == 0 or any(isinstance(p, str | list) and len(p) == 0 for p in v):
            raise ValueError("prompt must not be empty (nor any prompt of a batch)")
        return v

    @model_validator(mode="after")
    def _echo_only_for_nothing(self) -> CompletionRequest:
        if self.max_tokens == 0 and not self.echo:
            raise FieldError("max_tokens", "max_tokens must be > 0 unless echo is set (scoring the prompt)")
        return self

    @property
    def prompts(self) -> list[str | list[int]]:
        """The batch: a string or a list of token ids is one prompt."""
        v: Any = self.prompt
        return [v] if isinstance(v, str) or isinstance(v[0], int) else list(v)

    def sampling(self, default_max_tokens: int) -> SamplingParams:
        # Echo scores the prompt: with logprobs to report them, and with max_tokens 0 because then the
        # prompt's scoring is the whole request (its logprobs are simply not reported without logprobs).
        scored = self.echo and (self.logprobs is not None or self.max_tokens == 0)
        return self._sampling(
            default_max_tokens,
            logprobs=self.logprobs,
            prompt_logprobs=(self.logprobs or 0) if scored else None,
        )


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    role: Literal["system", "user", "assistant"]
    content: str


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage]
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)

    @field_validator("messages")
    @classmethod
    def _non_empty(cls, v: list[ChatMessage]) -> list[ChatMessage]:
        if not v:
            raise ValueError("messages must not be empty")
        return v

    @model_validator(mode="after")
    def _chat_settings(self) -> ChatCompletionRequest:
        if self.max_tokens == 0:
            raise FieldError("max_tokens", "max_tokens must be > 0")
        if self.top_logprobs is not None and not self.logprobs:
            raise FieldError("top_logprobs", "top_logprobs needs logprobs: true")
        return self

    def sampling(self, default_max_tokens: int) -> SamplingParams:
        return self._sampling(default_max_tokens, logprobs=(self.top_logprobs or 0) if self.logprobs else None)


class APIError(Exception):
    """An error with an HTTP status and the OpenAI error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    def __reduce__(self) -> tuple[type[APIError], tuple[int, str, str | None, str | None]]:
        return APIError, (self.status, self.message, self.param, self.code)  # picklable across Ray

    @property
    def kind(self) -> str:
        kinds = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error", 500: "server_error",
                 503: "service_unavailable"}  # fmt: skip
        return kinds.get(self.status, "invalid_request_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def to_dict(self) -> dict[str, Any]:
        """Plain data, to cross process boundaries (replica -> ingress)."""
        return {"status": self.status, "message": self.message, "param": self.param, "code": self.code}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> APIError:
        return cls(d["status"], d["message"], d.get("param"), d.get("code"))


def validation_error(e: ValidationError) -> APIError:
    """The first problem of a pydantic error, as a 400 naming its field (dotted path)."""
    first = e.errors()[0]
    cause = (first.get("ctx") or {}).get("error")
    if isinstance(cause, FieldError):  # a rule across fields, naming its own
        return APIError(400, str(cause), param=cause.field, code="invalid_value")
    # Union members appear in the path as type tags ("prompt.str", "stop.list[str]"): not fields.
    path = [str(p) for p in first["loc"] if not (isinstance(p, str) and _TYPE_TAG.match(p))]
    param = ".".join(path) or None
    return APIError(400, f"{param}: {first['msg']}" if param else first["msg"], param=param, code="invalid_value")
