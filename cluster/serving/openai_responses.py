"""OpenAI response bodies: completions and chat, whole or as SSE chunks, with logprobs as OpenAI
shapes them.

Completions (the legacy shape): `logprobs` is `{"tokens", "token_logprobs", "top_logprobs",
"text_offset"}`; with `echo` the prompt's tokens come first, the first of them with a null
logprob, and `top_logprobs` holds the k most likely tokens plus the chosen one. Chat: `logprobs`
is `{"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}]}`
with exactly the k most likely as alternatives. Choices are numbered prompt by prompt: choice j of
prompt i is `i * n + j`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from cluster.serving.messages import Logprob, ToolCallOut, Update


@dataclass
class Choice:
    """One choice, accumulated from its updates."""

    index: int
    echo: str = ""  # the prompt's text in front of the completion (completions with echo)
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    logprobs: list[Logprob] = field(default_factory=list)
    prompt_logprobs: list[Logprob] = field(default_factory=list)  # with echo and logprobs
    tool_calls: list[ToolCallOut] = field(default_factory=list)

    def add(self, u: Update) -> None:
        self.text += u.text
        self.token_ids += u.token_ids
        self.logprobs += u.logprobs
        self.tool_calls += u.tool_calls
        self.finish_reason = u.finish_reason or self.finish_reason


class Reply:
    """What every body of one request shares (id, model, replica) and its shapes."""

    def __init__(self, request_id: str, model: str, replica: str, chat: bool, logprobs: bool, echo: bool) -> None:
        self.id = ("chatcmpl-" if chat else "cmpl-") + request_id
        self.model, self.replica, self.chat = model, replica, chat
        self.logprobs, self.echo = logprobs, echo  # asked for
        self.created = int(time.time())

    def _base(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": self.replica}  # fmt: skip

    @property
    def _object(self) -> str:
        return "chat.completion" if self.chat else "text_completion"

    def full(self, choices: list[Choice], usage: dict[str, Any]) -> dict[str, Any]:
        body = []
        for c in sorted(choices, key=lambda c: c.index):
            if self.chat:
                message: dict[str, Any] = {"role": "assistant", "content": c.text}
                if c.tool_calls:  # OpenAI's shape: content null beside the calls when there is no text
                    message = {"role": "assistant", "content": c.text or None,
                               "tool_calls": [t.openai() for t in c.tool_calls]}  # fmt: skip
                out: dict[str, Any] = {"index": c.index, "message": message}
                out["logprobs"] = chat_logprobs(c.logprobs) if self.logprobs else None
            else:
                out = {"index": c.index, "text": c.echo + c.text, "logprobs": None}
                if self.logprobs:
                    prompt = c.prompt_logprobs if self.echo else []
                    out["logprobs"] = legacy_logprobs(prompt + c.logprobs, len(c.echo), len(prompt))
            out["finish_reason"] = c.finish_reason
            body.append(out)
        return self._base(self._object) | {"choices": body, "usage": usage}

    def chunk(
        self,
        index: int,
        text: str = "",
        reason: str | None = None,
        logprobs: list[Logprob] | None = None,
        prompt: list[Logprob] | None = None,
        delta: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """A streamed piece of choice `index`: new text (or a chat delta), its tokens' logprobs, and on a
        completion's first chunk with echo, the prompt's (`prompt`, its text in `text`)."""
        if self.chat:
            choice: dict[str, Any] = {"index": index, "delta": delta if delta is not None else {"content": text}}
            choice["logprobs"] = chat_logprobs(logprobs or []) if self.logprobs and delta is None else None
            body = self._base("chat.completion.chunk")
        else:
            choice = {"index": index, "text": text}
            entries = (prompt or []) + (logprobs or [])
            choice["logprobs"] = legacy_logprobs(entries, 0, len(prompt or [])) if self.logprobs else None
            body = self._base("text_completion")
        choice["finish_reason"] = reason
        return body | {"choices": [choice]}

    def usage_chunk(self, usage: dict[str, Any]) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return self._base(obj) | {"choices": [], "usage": usage}


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def legacy_logprobs(entries: list[Logprob], completion_offset: int, prompt_entries: int) -> dict[str, Any]:
    """The completions shape. `text_offset` is each token's character offset in the returned text:
    the prompt's tokens (the first `prompt_entries`) from 0, the completion's from the echoed
    prompt's length (`completion_offset`)."""
    offsets, offset = [], 0
    for i, e in enumerate(entries):
        if i == prompt_entries:
            offset = completion_offset
        offsets.append(offset)
        offset += len(e.token)
    top = [None if e.logprob is None else {t: lp for t, _, lp in e.top} | {e.token: e.logprob} for e in entries]
    return {
        "tokens": [e.token for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": top,  # the k most likely and the chosen token; None for the prompt's first
        "text_offset": offsets,
    }


def chat_logprobs(entries: list[Logprob]) -> dict[str, Any]:
    """The chat shape."""
    content = [
        {"token": e.token, "logprob": e.logprob, "bytes": e.bytes,
         "top_logprobs": [{"token": t, "logprob": lp, "bytes": b} for t, b, lp in e.top]}
        for e in entries
    ]  # fmt: skip
    return {"content": content, "refusal": None}
