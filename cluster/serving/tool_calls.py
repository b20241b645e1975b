"""Tool calls in the model's own format (Mistral v3): `[TOOL_CALLS]` then a JSON list of calls.

    [TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}]</s>

A request's `tool_choice` becomes generation settings (`constrain`): `none` bans the
`[TOOL_CALLS]` token, `required` and a named function force a call by a grammar of that syntax
(each function's `parameters` schema inside it), `auto` leaves the model free. Its output goes
through one `ToolCallReader` per choice: text before `[TOOL_CALLS]` streams as content, what
follows is held and parsed when the choice ends. What does not parse as calls (under `auto`, or
cut by `max_tokens`) comes back as content, never as an error.
"""

from __future__ import annotations

import json
import secrets
import string

from mistral_common.protocol.instruct.tool_calls import FunctionCall
from pydantic import ValidationError

from cluster.engine.request import RequestError, SamplingParams
from cluster.engine.structured import StructuredOutput, tool_call_grammar
from cluster.serving.messages import ToolCallOut, Update
from cluster.serving.openai_protocol import NamedToolChoice, Tool, ToolChoice

_ID_CHARS = string.ascii_letters + string.digits
ID_LENGTH = 9  # the Mistral format's tool-call ids: 9 alphanumerics


def call_id() -> str:
    return "".join(secrets.choice(_ID_CHARS) for _ in range(ID_LENGTH))


def constrain(
    params: SamplingParams, tools: list[Tool] | None, choice: ToolChoice | None, parallel: bool,
    tool_calls_id: int | None,
) -> SamplingParams:  # fmt: skip
    """`params` with what `tool_choice` asks of generation; `RequestError` naming `tools` for a
    model whose tokenizer has no tool tokens."""
    if not tools:
        return params
    if tool_calls_id is None:
        raise RequestError("this model's tokenizer has no tool-call tokens (the v1 format of Mixtral 8x7B "
                           "Instruct); send no tools", "tools")  # fmt: skip
    if choice == "none":
        return params.model_copy(update={"bad_token_ids": [*params.bad_token_ids, tool_calls_id]})
    if choice == "required" or isinstance(choice, NamedToolChoice):
        name = choice.function.name if isinstance(choice, NamedToolChoice) else None
        functions = [t.model_dump(exclude_none=True) for t in tools]
        lark = tool_call_grammar(functions, name, parallel, tool_calls_id)
        return params.model_copy(update={"structured": StructuredOutput(kind="lark", spec=lark, param="tool_choice")})
    return params


def parse_calls(text: str) -> list[ToolCallOut] | None:
    """The calls in the JSON text after `[TOOL_CALLS]`, validated by mistral-common's
    `FunctionCall`; None if it is not a non-empty list of `{"name", "arguments"}` objects."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(raw, list) or not raw or not all(isinstance(c, dict) for c in raw):
        return None
    calls = []
    for c in raw:
        try:
            f = FunctionCall.model_validate({"name": c.get("name"), "arguments": c.get("arguments")})
        except ValidationError:
            return None
        arguments = f.arguments if isinstance(f.arguments, str) else json.dumps(f.arguments)
        given = c.get("id")
        valid_id = isinstance(given, str) and len(given) == ID_LENGTH and given.isalnum() and given.isascii()
        calls.append(ToolCallOut(id=given if valid_id else call_id(), name=f.name, arguments=arguments))
    return calls


class ToolCallReader:
    """One choice's updates, read for tool calls: text streams until the `[TOOL_CALLS]` token, then
    is held; the last update carries the parsed calls (finish_reason "tool_calls") or the held text."""

    def __init__(self, tool_calls_id: int) -> None:
        self.tool_calls_id = tool_calls_id
        self.calling = False
        self.held = ""

    def read(self, u: Update) -> Update:
        if not self.calling and self.tool_calls_id in u.token_ids:
            self.calling = True
        if not self.calling:
            return u
        self.held += u.text
        if u.finish_reason is None:
            return u.model_copy(update={"text": ""})
        calls = parse_calls(self.held.strip()) if u.finish_reason == "stop" else None
        if calls is None:  # not calls after all (or cut short): the text is the reply
            return u.model_copy(update={"text": self.held})
        return u.model_copy(update={"text": "", "tool_calls": calls, "finish_reason": "tool_calls"})
