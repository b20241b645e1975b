"""OpenAI-compatible request bodies and error responses.

Requests are validated with pydantic; any failure becomes a 400 whose body names the field:
`{"error": {"message": ..., "type": "invalid_request_error", "param": "temperature", "code": ...}}`.

Honoured or refused, never ignored: every field that changes what is generated is implemented
here or refused with a 400 naming it. A field this server does not know is refused too (as
OpenAI does), so a misspelt or newer option never silently changes nothing. `ACCEPTED_UNUSED`
lists the fields that cannot change the output and are taken as they are.
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cluster.engine.request import SamplingParams
from cluster.engine.structured import StructuredOutput
from model.sampling import LOGIT_BIAS_LIMIT, SEED_MAX, SEED_MIN
from protocol.step import MAX_TOP_LOGPROBS

# Fields accepted because they cannot change what is generated (README: "Request fields").
ACCEPTED_UNUSED = ("user", "store", "metadata", "service_tier", "stream_options", "parallel_tool_calls")
_FLOATS = ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty")

_TYPE_TAG = re.compile(r"^(str|int|float|bool|list|dict|none|[a-z-]+\[.*\])$")


class FieldError(ValueError):
    """A rule across fields, raised by a model validator, that still names the field to blame."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class _Request(BaseModel):
    # Unknown fields are refused (a 400 naming them); types of known fields are strict.
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str
    max_tokens: int | None = Field(default=None, ge=0)  # 0 only to echo a prompt (completions)
    max_completion_tokens: int | None = Field(default=None, gt=0)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)  # None: 1.0
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)  # extension (vLLM's); 0 = off
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)  # extension (vLLM's)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0)  # extension (vLLM's)
    logit_bias: dict[str, float | int] | None = None  # token id (as a string) -> -100..100
    min_tokens: int | None = Field(default=None, ge=0)  # extension (vLLM's)
    stop_token_ids: list[int] | None = None  # extension (vLLM's)
    ignore_eos: bool | None = None  # extension (vLLM's)
    n: int | None = Field(default=None, ge=1)  # choices per prompt; the server's engine.max_n caps it
    stream: bool | None = None
    stream_options: dict[str, Any] | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX)
    # Accepted, and unused: they cannot change the output.
    user: str | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None

    @field_validator(*_FLOATS, mode="before")
    @classmethod
    def _int_is_a_float(cls, v: Any) -> Any:
        return float(v) if isinstance(v, int) and not isinstance(v, bool) else v

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v: dict[str, float | int] | None) -> dict[str, float | int] | None:
        for key, bias in (v or {}).items():
            if not key.isdigit():
                raise ValueError(f"logit_bias keys are token ids; {key!r} is not one")
            if not -LOGIT_BIAS_LIMIT <= bias <= LOGIT_BIAS_LIMIT:
                raise ValueError(f"logit_bias values are -100..100; token {key} has {bias}")
        return v

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
        given = {name: getattr(self, name) for name in _SAMPLING_FIELDS if getattr(self, name) is not None}
        return SamplingParams(
            max_tokens=default_max_tokens if max_tokens is None else max_tokens,
            stop=stops,
            logit_bias={int(t): float(b) for t, b in (self.logit_bias or {}).items()},
            **given,
            **extra,
        )

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))

    @property
    def choices(self) -> int:
        return self.n or 1

    @property
    def streamed(self) -> bool:
        return bool(self.stream)


# Request fields that are `SamplingParams` fields of the same name and meaning (None: its default).
_SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                    "repetition_penalty", "min_tokens", "stop_token_ids", "ignore_eos", "seed", "n")  # fmt: skip


class JsonSchema(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None  # the schema is always enforced (by the grammar), strict or not


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchema | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is given with, and only with, type json_schema")
        return self

    def structured(self) -> StructuredOutput | None:
        if self.type == "json_schema":
            assert self.json_schema is not None
            return StructuredOutput.json_schema(self.json_schema.schema_, "response_format.json_schema.schema")
        if self.type == "json_object":
            return StructuredOutput.json_schema({"type": "object"}, "response_format")
        return None


class StructuredOutputs(BaseModel):
    """vLLM's `structured_outputs` (completions and chat): exactly one of its fields."""

    model_config = ConfigDict(extra="forbid", strict=True)

    json_: dict[str, Any] | str | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None  # Lark (llguidance's dialect)

    @model_validator(mode="after")
    def _one(self) -> StructuredOutputs:
        if sum(v is not None for v in (self.json_, self.regex, self.choice, self.grammar)) != 1:
            raise ValueError("structured_outputs takes exactly one of json, regex, choice, grammar")
        return self

    def structured(self, prefix: str = "structured_outputs.") -> StructuredOutput:
        if self.json_ is not None:
            schema = self.json_ if isinstance(self.json_, str) else json.dumps(self.json_)
            return StructuredOutput(kind="json", spec=schema, param=prefix + "json")
        if self.regex is not None:
            return StructuredOutput(kind="regex", spec=self.regex, param=prefix + "regex")
        if self.choice is not None:
            return StructuredOutput(kind="choice", spec=json.dumps(self.choice), param=prefix + "choice")
        assert self.grammar is not None
        return StructuredOutput(kind="lark", spec=self.grammar, param=prefix + "grammar")


class _Constrained(_Request):
    """The structured-output fields both endpoints take: OpenAI's `response_format`, vLLM's
    `structured_outputs` and its older `guided_json` / `guided_regex` / `guided_choice`."""

    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    @model_validator(mode="after")
    def _one_constraint(self) -> _Constrained:
        given = [name for name in _CONSTRAINTS if getattr(self, name) is not None]
        if self.response_format is not None and self.response_format.type == "text":
            given.remove("response_format")
        if len(given) > 1:
            raise FieldError(given[1], f"{given[1]} and {given[0]} both constrain the output; send one")
        return self

    def structured(self) -> StructuredOutput | None:
        if self.response_format is not None and self.response_format.type != "text":
            return self.response_format.structured()
        if self.structured_outputs is not None:
            return self.structured_outputs.structured()
        guided = {"json": self.guided_json, "regex": self.guided_regex, "choice": self.guided_choice,
                  "grammar": self.guided_grammar}  # fmt: skip
        for key, value in guided.items():
            if value is not None:
                return StructuredOutputs.model_validate({key: value}).structured(prefix="guided_")
        return None


_CONSTRAINTS = ("response_format", "structured_outputs", "guided_json", "guided_regex", "guided_choice",
                "guided_grammar")  # fmt: skip


class CompletionRequest(_Constrained):
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
        structured = self.structured()
        if structured is not None and scored and self.max_tokens == 0:
            raise FieldError(structured.param.split(".")[0], "nothing is generated to constrain (max_tokens 0)")
        return self._sampling(
            default_max_tokens,
            logprobs=self.logprobs,
            prompt_logprobs=(self.logprobs or 0) if scored else None,
            structured=structured,
        )


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    """One message of a conversation, as OpenAI's clients send it (content parts included)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None  # text, or text parts (checked by the request)
    name: str | None = None  # a tool message's function name
    tool_calls: list[ToolCall] | None = None  # an assistant's calls
    tool_call_id: str | None = None  # the call a tool message answers
    refusal: None = None  # what the openai client echoes back of an assistant message
    function_call: None = None
    annotations: list[Any] | None = None

    @field_validator("content")
    @classmethod
    def _text_parts(cls, v: str | list[dict[str, Any]] | None) -> str | list[dict[str, Any]] | None:
        """Content parts must be text: the model reads nothing else (refused by part, naming its type)."""
        for j, part in enumerate(v if isinstance(v, list) else []):
            kind = part.get("type")
            if kind != "text" or not isinstance(part.get("text"), str) or set(part) - {"type", "text"}:
                raise ValueError(f"part {j}: content parts of type {kind!r} are not supported: this model reads "
                                 "text only ({'type': 'text', 'text': ...})")  # fmt: skip
        return v

    @model_validator(mode="after")
    def _shape(self) -> ChatMessage:
        if self.role == "tool" and self.tool_call_id is None:
            raise FieldError("tool_call_id", "a tool message names the call it answers (tool_call_id)")
        if self.role != "tool" and self.tool_call_id is not None:
            raise FieldError("tool_call_id", f"tool_call_id belongs to tool messages, not {self.role}")
        if self.tool_calls is not None and self.role != "assistant":
            raise FieldError("tool_calls", f"tool_calls belong to assistant messages, not {self.role}")
        if self.name is not None and self.role != "tool":
            raise FieldError("name", "the Mistral chat format has no participant names; name is for tool messages")
        if self.content is None and not self.tool_calls:
            raise FieldError("content", f"a {self.role} message needs content")
        return self

    def mistral(self) -> dict[str, Any]:
        """The message as mistral-common's `ChatCompletionRequest.from_openai` reads it (the
        developer role is a system message there)."""
        out = self.model_dump(exclude_none=True, exclude={"refusal", "function_call", "annotations"})
        out["role"] = "system" if self.role == "developer" else self.role
        return out


class Function(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None  # calls forced by tool_choice always follow `parameters`


class Tool(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["function"]
    function: Function


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    class Name(BaseModel):
        model_config = ConfigDict(extra="forbid", strict=True)
        name: str

    type: Literal["function"]
    function: Name


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class ChatCompletionRequest(_Constrained):
    messages: list[ChatMessage]
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None  # default: auto with tools, none without
    parallel_tool_calls: bool | None = None  # default true

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
        names = [t.function.name for t in self.tools or []]
        choice = self.tool_choice
        if choice == "required" and not names:
            raise FieldError("tool_choice", "tool_choice required needs tools")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            name = choice.function.name
            raise FieldError("tool_choice", f"tool_choice names {name!r}, which is not in tools {names}")
        if names and self.calls_tools and self.structured() is not None:
            raise FieldError("response_format", "a constrained response and tool calls cannot be combined; send "
                             "tool_choice none, or no response_format")  # fmt: skip
        return self

    @property
    def calls_tools(self) -> bool:
        """Whether the reply may (or must) be tool calls."""
        return bool(self.tools) and self.tool_choice != "none"

    def sampling(self, default_max_tokens: int) -> SamplingParams:
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self._sampling(default_max_tokens, logprobs=logprobs, structured=self.structured())


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


def validation_error(e: ValidationError) -> APIError:
    """The first problem of a pydantic error, as a 400 naming its field (dotted path)."""
    first = e.errors()[0]
    cause = (first.get("ctx") or {}).get("error")
    # Union members appear in the path as type tags ("prompt.str", "stop.list[str]"): not fields.
    path = [str(p) for p in first["loc"] if not (isinstance(p, str) and _TYPE_TAG.match(p))]
    if isinstance(cause, FieldError):  # a rule across fields, naming its own (under the model it checks)
        return APIError(400, str(cause), param=".".join([*path, cause.field]), code="invalid_value")
    param = ".".join(path) or None
    return APIError(400, f"{param}: {first['msg']}" if param else first["msg"], param=param, code="invalid_value")
