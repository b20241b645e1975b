"""A request's way to the model copies and back, the same for HTTP and gRPC: each prompt of a
parsed request sent to a copy (`ModelCopies.start`: all accepted, or the first refusal for the
whole request), their updates merged as they come, timed for the latency histograms, and
cancelled when the client goes away; a copy's failure is a 503 (429 when Serve's queue is full),
never a 500.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from cluster.serving.messages import Failure, GenerateCall, Head, Logprob, Update
from cluster.serving.metrics import Metrics
from cluster.serving.openai_protocol import APIError, ChatCompletionRequest, CompletionRequest, validation_error
from cluster.serving.openai_responses import Choice

logger = logging.getLogger(__name__)

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
CHAT_DEFAULT_MAX_TOKENS = 256
HEALTH_TIMEOUT_S = 5.0  # /health answers within this, well inside a load balancer's probe timeout

OpenAIRequest = CompletionRequest | ChatCompletionRequest
M = TypeVar("M", bound=BaseModel)


@dataclass
class Started:
    """One prompt of a request, sent to a model copy: its stream, its head, where its choices go."""

    gen: Any
    head: Head
    first_index: int  # its choices are first_index .. first_index + n - 1


class ModelCopies:
    """The model copies behind the ingress (the `LLMServer` deployment's handle), for the requests
    of one model name."""

    def __init__(self, llm: DeploymentHandle[Any], model_name: str, counters: Metrics) -> None:
        self.llm = llm
        self.model_name = model_name
        self.counters = counters

    def check_model(self, model: Any) -> None:
        if model != self.model_name:
            raise APIError(404, f"model {model!r} does not exist; this server has {self.model_name!r}",
                           param="model", code="model_not_found")  # fmt: skip

    async def start(self, req: OpenAIRequest) -> tuple[list[Started], str]:
        """Send each prompt of a validated request to a model copy; their streams once every copy has
        accepted its prompt (the first refusal is the request's, and the others are cancelled)."""
        self.check_model(req.model)
        request_id = uuid.uuid4().hex
        gens: list[Any] = [self.llm.options(stream=True).stream.remote(call) for call in _calls(req, request_id)]
        heads: list[Any] = await asyncio.gather(*(_head(g) for g in gens), return_exceptions=True)
        refused = next((h for h in heads if not isinstance(h, Head)), None)
        if refused is not None:
            for g, h in zip(gens, heads, strict=True):
                if isinstance(h, Head):  # accepted: abort it (a refused stream has nothing to cancel)
                    g.cancel()
            if isinstance(refused, Failure):
                raise refused.error()
            raise refused if isinstance(refused, APIError) else unavailable(refused)
        n = req.choices
        return [Started(g, h, i * n) for i, (g, h) in enumerate(zip(gens, heads, strict=True))], request_id

    async def updates(self, gen: Any) -> AsyncIterator[Update]:
        """Updates from the model copy, timed for the latency histograms; cancels it if abandoned."""
        start = last = time.monotonic()
        first = True
        try:
            async for update in _guarded(gen):
                if isinstance(update, Failure):
                    raise update.error()
                now = time.monotonic()
                if update.token_ids:
                    (self.counters.ttft if first else self.counters.itl).observe(now - (start if first else last))
                    first, last = False, now
                    self.counters.generated_tokens.inc(len(update.token_ids))
                yield update
        finally:
            gen.cancel()  # a no-op once finished; aborts the request when the client has gone

    async def merged(self, started: list[Started]) -> AsyncIterator[tuple[Started, Update]]:
        """The updates of every prompt of a request, as they come."""
        if len(started) == 1:  # the usual case: no tasks needed
            async for u in self.updates(started[0].gen):
                yield started[0], u
            return
        queue: asyncio.Queue[tuple[Started, Update | APIError | None]] = asyncio.Queue()

        async def pump(s: Started) -> None:
            try:
                async for u in self.updates(s.gen):
                    await queue.put((s, u))
            except APIError as e:
                await queue.put((s, e))
            finally:
                await queue.put((s, None))

        tasks = [asyncio.create_task(pump(s)) for s in started]
        try:
            ended = 0
            while ended < len(tasks):
                s, item = await queue.get()
                if item is None:
                    ended += 1
                elif isinstance(item, APIError):
                    raise item
                else:
                    yield s, item
        finally:
            for t in tasks:
                t.cancel()

    async def collect(self, started: list[Started], n: int, echo: bool) -> Tally:
        """Every update of every prompt, added up: the whole reply's choices and counts."""
        tally = Tally(n, echo)
        async for s, u in self.merged(started):
            tally.add(s, u)
        return tally


class Tally:
    """What a request's updates add up to; the one accumulator of the streamed and the whole reply
    (HTTP and gRPC): each choice, the completion tokens, the prompt tokens served from the prefix
    cache, and each prompt's logprobs (every choice of a prompt shows them)."""

    def __init__(self, n: int, echo: bool) -> None:
        self.n, self.echo = n, echo
        self.completion_tokens = 0
        self._choices: dict[int, Choice] = {}
        self._cached: dict[int, int] = {}  # per prompt (its first choice's index)
        self._prompt_logprobs: dict[int, list[Logprob]] = {}  # per prompt

    def add(self, s: Started, u: Update) -> tuple[int, bool]:
        """Count `u` in: its choice's index, and whether it is that choice's first update."""
        index = s.first_index + u.index
        self.completion_tokens += len(u.token_ids)
        self._cached[s.first_index] = u.cached_tokens
        if u.prompt_logprobs is not None:
            self._prompt_logprobs[s.first_index] = u.prompt_logprobs
        first = index not in self._choices
        if first:
            self._choices[index] = Choice(index, echo=s.head.prompt_text if self.echo else "")
        self._choices[index].add(u)
        return index, first

    @property
    def cached_tokens(self) -> int:
        return sum(self._cached.values())

    def prompt_logprobs(self, s: Started) -> list[Logprob]:
        return self._prompt_logprobs.get(s.first_index, [])

    def choices(self) -> list[Choice]:
        """The choices so far, each with its prompt's logprobs."""
        for c in self._choices.values():
            c.prompt_logprobs = self._prompt_logprobs.get(c.index - c.index % self.n, [])
        return list(self._choices.values())


async def _head(gen: Any) -> Head | Failure:
    """The model copy's first answer to a request (its prompt size, or its error)."""
    try:
        first: Head | Failure = await gen.__anext__()
    except StopAsyncIteration as e:
        raise APIError(503, "the model copy ended the request without an answer", code="engine_unavailable") from e
    except Exception as e:
        raise unavailable(e) from e
    return first


async def _guarded(gen: Any) -> AsyncIterator[Update | Failure]:
    """A model copy's stream, with its failures (replica died, Serve's queue full) as 503s, not 500s."""
    try:
        async for item in gen:
            yield item
    except Exception as e:
        raise unavailable(e) from e


def unavailable(e: Exception) -> APIError:
    if isinstance(e, BackPressureError):
        return APIError(429, "every model copy is at capacity (queue full); retry shortly", code="overloaded")
    logger.warning("a model copy failed a request: %s", type(e).__name__)
    return APIError(503, "the model copy serving this request is unavailable; retry shortly", code="engine_unavailable")


def parse(data: dict[str, Any], chat: bool) -> OpenAIRequest:
    try:
        return (ChatCompletionRequest if chat else CompletionRequest).model_validate(data)
    except ValidationError as e:
        raise validation_error(e) from e


def _calls(req: OpenAIRequest, request_id: str) -> list[GenerateCall]:
    """The request as the model copies receive it: one call per prompt of a completions batch."""
    if isinstance(req, ChatCompletionRequest):
        return [
            GenerateCall(
                id=request_id, messages=req.messages, params=req.sampling(CHAT_DEFAULT_MAX_TOKENS), tools=req.tools,
                tool_choice=req.tool_choice, parallel_tool_calls=req.parallel_tool_calls is not False,
            )
        ]  # fmt: skip
    params = req.sampling(COMPLETION_DEFAULT_MAX_TOKENS)
    prompts = req.prompts
    ids = [request_id] if len(prompts) == 1 else [f"{request_id}-{i}" for i in range(len(prompts))]
    return [GenerateCall(id=rid, prompt=p, params=params, echo=req.echo) for rid, p in zip(ids, prompts, strict=True)]


def validated(model: type[M], data: dict[str, Any]) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise validation_error(e) from e


def refused(answer: dict[str, Any]) -> dict[str, Any]:
    """A model copy's answer to a tokenizer call, or its refusal raised as an APIError."""
    if "error" in answer:
        raise Failure.model_validate(answer["error"]).error()
    return answer
