"""The Serve ingress: OpenAI-compatible HTTP routes and the gRPC methods of `inference.proto`.

Routes: `/v1/completions`, `/v1/chat/completions` (JSON and SSE), `/v1/models`, `/health`,
`/metrics`. It parses and validates request bodies (`cluster/serving/openai_protocol.py`), enforces the
API key and the body size, sends each request to a model copy as a `GenerateCall`, turns the
copy's answers into OpenAI JSON, SSE or gRPC messages, and cancels the copy's work when a
client goes away. Serve builds its FastAPI app per replica from the config it was given
(`__serve_build_asgi_app__`), so the class lives at module level and holds no closure.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, ValidationError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from cluster.proto import inference_pb2
from cluster.serving.config import ServeConfig
from cluster.serving.messages import Failure, GenerateCall, Head, Logprob, TokenizeCall, Update
from cluster.serving.metrics import Metrics
from cluster.serving.openai_protocol import APIError, ChatCompletionRequest, CompletionRequest, validation_error
from cluster.serving.openai_responses import Choice, Reply, usage

logger = logging.getLogger(__name__)
pb: Any = inference_pb2  # generated module: its message classes are made at import time

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
CHAT_DEFAULT_MAX_TOKENS = 256
HEALTH_TIMEOUT_S = 5.0  # /health answers within this, well inside a load balancer's probe timeout

OpenAIRequest = CompletionRequest | ChatCompletionRequest
M = TypeVar("M", bound=BaseModel)


@dataclass
class _Started:
    """One prompt of a request, sent to a model copy: its stream, its head, where its choices go."""

    gen: Any
    head: Head
    first_index: int  # its choices are first_index .. first_index + n - 1


class Ingress:
    def __init__(self, llm: DeploymentHandle[Any], config: ServeConfig) -> None:
        self.llm = llm
        self.serving = config.serving
        self.model_name = config.model.name
        self.counters = Metrics()

    def __serve_build_asgi_app__(self) -> FastAPI:
        app = FastAPI(title="mixtral-cluster", version="0.1.0")
        app.middleware("http")(self.guard)
        app.add_api_route("/health", self.health, methods=["GET"])
        app.add_api_route("/metrics", self.metrics, methods=["GET"])
        app.add_api_route("/v1/models", self.models, methods=["GET"])
        app.add_api_route("/v1/completions", self.completions, methods=["POST"])
        app.add_api_route("/v1/chat/completions", self.chat_completions, methods=["POST"])
        app.add_api_route("/tokenize", self.tokenize, methods=["POST"])
        app.add_api_route("/detokenize", self.detokenize, methods=["POST"])
        app.add_api_route("/tokenizer_info", self.tokenizer_info, methods=["GET"])
        app.add_api_route("/admin/rebalance", self.rebalance, methods=["POST"])
        return app

    async def guard(self, request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        """Every route but /health needs the API key (when one is set); bodies over the limit are refused."""
        srv = self.serving
        if srv.api_key and request.url.path != "/health":
            if request.headers.get("authorization", "") != f"Bearer {srv.api_key}":
                return _error(APIError(401, "missing or wrong API key (Authorization: Bearer <key>)"))
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > srv.max_body_bytes):
            return _error(APIError(413, f"request body over {srv.max_body_bytes} bytes", code="body_too_large"))
        return await call_next(request)

    # ---- HTTP ---------------------------------------------------------------------------------

    async def health(self) -> Response:
        try:
            replica = await asyncio.wait_for(self.llm.health.remote(), timeout=HEALTH_TIMEOUT_S)
        except Exception as e:
            return JSONResponse({"status": "unhealthy", "detail": str(e) or type(e).__name__}, status_code=503)
        return JSONResponse({"status": "ok", "replica": replica})

    async def metrics(self) -> Response:
        try:
            self.counters.observe_engine(await asyncio.wait_for(self.llm.stats.remote(), timeout=10))
        except Exception as e:
            logger.warning("engine stats unavailable for /metrics: %s", e)
        return PlainTextResponse(self.counters.render(), media_type="text/plain; version=0.0.4")

    async def models(self) -> Response:
        self.counters.requests.labels("models", "200").inc()
        card = {"id": self.model_name, "object": "model", "created": 0, "owned_by": "mixtral-cluster"}
        return JSONResponse({"object": "list", "data": [card]})

    async def completions(self, request: Request) -> Response:
        return await self._openai(request, chat=False)

    async def chat_completions(self, request: Request) -> Response:
        return await self._openai(request, chat=True)

    async def tokenize(self, request: Request) -> Response:
        """vLLM's route: `{"prompt": ..., "add_special_tokens": true}` or `{"messages": [...]}` -> token ids."""
        try:
            data = await self._json_body(request)
            self._check_model(data.get("model", self.model_name))
            call = _validated(TokenizeCall, {k: v for k, v in data.items() if k != "model"})
            answer = await self.llm.tokenize.remote(call)
        except APIError as e:
            return _error(e)
        return _answer(answer)

    async def detokenize(self, request: Request) -> Response:
        """vLLM's route: `{"tokens": [...]}` -> `{"prompt": text}`."""
        try:
            data = await self._json_body(request)
            self._check_model(data.get("model", self.model_name))
            tokens = _validated(_Tokens, {"tokens": data.get("tokens")}).tokens
            answer = await self.llm.detokenize.remote(tokens)
        except APIError as e:
            return _error(e)
        return _answer(answer)

    async def rebalance(self) -> Response:
        """Admin: re-place the experts from the load since the last placement (`LLM.rebalance`). Only
        with an API key configured (the middleware has checked it): without one it is refused."""
        if not self.serving.api_key:
            return _error(APIError(403, "admin routes need serving.api_key to be set", code="admin_disabled"))
        return _answer(await self.llm.rebalance.remote())

    async def tokenizer_info(self) -> Response:
        return JSONResponse(await self.llm.tokenizer_info.remote())

    async def _openai(self, request: Request, chat: bool) -> Response:
        route = "chat" if chat else "completions"
        retry = self.serving.retry_after_s
        try:
            req = _parse(await self._json_body(request), chat)
            started, request_id = await self._start(req)
        except APIError as e:
            self.counters.requests.labels(route, str(e.status)).inc()
            return _error(e, retry)
        self.counters.requests.labels(route, "200").inc()
        prompt_tokens = sum(s.head.prompt_tokens for s in started)
        self.counters.prompt_tokens.inc(prompt_tokens)
        wants_logprobs = req.logprobs is not None if isinstance(req, CompletionRequest) else bool(req.logprobs)
        echo = isinstance(req, CompletionRequest) and req.echo
        reply = Reply(request_id, self.model_name, started[0].head.replica, chat, wants_logprobs, echo)
        if req.streamed:
            sse = self._sse(started, reply, prompt_tokens, req.include_usage)
            return StreamingResponse(sse, media_type="text/event-stream")
        try:
            choices, cached = await self._collect(started, req.choices, echo)
        except APIError as e:
            return _error(e, retry)
        completion = sum(len(c.token_ids) for c in choices)
        return JSONResponse(reply.full(choices, usage(prompt_tokens, completion, cached)))

    async def _json_body(self, request: Request) -> dict[str, Any]:
        limit = self.serving.max_body_bytes
        body = await request.body()
        if len(body) > limit:
            raise APIError(413, f"request body over {limit} bytes", code="body_too_large")
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the body is not valid JSON: {e}", code="invalid_json") from e
        if not isinstance(data, dict):
            raise APIError(400, "the body must be a JSON object", code="invalid_json")
        return data

    def _check_model(self, model: Any) -> None:
        if model != self.model_name:
            raise APIError(404, f"model {model!r} does not exist; this server has {self.model_name!r}",
                           param="model", code="model_not_found")  # fmt: skip

    async def _start(self, req: OpenAIRequest) -> tuple[list[_Started], str]:
        """Send each prompt of a validated request to a model copy; their streams once every copy has
        accepted its prompt (the first refusal is the request's, and the others are cancelled)."""
        self._check_model(req.model)
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
            raise refused if isinstance(refused, APIError) else _unavailable(refused)
        n = req.choices
        return [_Started(g, h, i * n) for i, (g, h) in enumerate(zip(gens, heads, strict=True))], request_id

    async def _updates(self, gen: Any) -> AsyncIterator[Update]:
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

    async def _merged(self, started: list[_Started]) -> AsyncIterator[tuple[_Started, Update]]:
        """The updates of every prompt of a request, as they come."""
        if len(started) == 1:  # the usual case: no tasks needed
            async for u in self._updates(started[0].gen):
                yield started[0], u
            return
        queue: asyncio.Queue[tuple[_Started, Update | APIError | None]] = asyncio.Queue()

        async def pump(s: _Started) -> None:
            try:
                async for u in self._updates(s.gen):
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

    async def _collect(self, started: list[_Started], n: int, echo: bool) -> tuple[list[Choice], int]:
        """Every choice of every prompt, whole; and the prompt tokens served from the prefix cache."""
        choices: dict[int, Choice] = {}
        prompt_logprobs: dict[int, list[Logprob]] = {}  # per prompt (its first choice's index)
        cached: dict[int, int] = {}
        async for s, u in self._merged(started):
            index = s.first_index + u.index
            choices.setdefault(index, Choice(index, echo=s.head.prompt_text if echo else "")).add(u)
            if u.prompt_logprobs is not None:
                prompt_logprobs[s.first_index] = u.prompt_logprobs
            cached[s.first_index] = u.cached_tokens
        for c in choices.values():  # every choice of a prompt shows that prompt's logprobs
            c.prompt_logprobs = prompt_logprobs.get(c.index - c.index % n, [])
        return list(choices.values()), sum(cached.values())

    async def _sse(
        self, started: list[_Started], reply: Reply, prompt_tokens: int, include_usage: bool
    ) -> AsyncIterator[str]:
        completion, cached = 0, {}
        opened: set[int] = set()
        prompt_logprobs: dict[int, list[Logprob]] = {}  # per prompt, for its choices' echo
        try:
            async for s, u in self._merged(started):
                index = s.first_index + u.index
                completion += len(u.token_ids)
                cached[s.first_index] = u.cached_tokens
                if u.prompt_logprobs is not None:
                    prompt_logprobs[s.first_index] = u.prompt_logprobs
                if index not in opened:  # a choice's first chunk: chat's role, a completion's echo
                    opened.add(index)
                    if reply.chat:
                        yield _sse(reply.chunk(index, delta={"role": "assistant", "content": ""}))
                    elif reply.echo:
                        echo = prompt_logprobs.get(s.first_index, [])
                        yield _sse(reply.chunk(index, text=s.head.prompt_text, prompt=echo))
                if u.tool_calls:  # OpenAI's deltas: a call's index, id and name first, then its arguments
                    for i, call in enumerate(u.tool_calls):
                        head = call.openai(i) | {"function": {"name": call.name, "arguments": ""}}
                        yield _sse(reply.chunk(index, delta={"tool_calls": [head]}))
                        arguments = {"index": i, "function": {"arguments": call.arguments}}
                        yield _sse(reply.chunk(index, delta={"tool_calls": [arguments]}))
                    yield _sse(reply.chunk(index, delta={}, reason=u.finish_reason))
                elif u.text or u.finish_reason or u.logprobs:
                    yield _sse(reply.chunk(index, text=u.text, reason=u.finish_reason, logprobs=u.logprobs))
        except APIError as e:
            yield _sse(e.body())
            return
        if include_usage:
            yield _sse(reply.usage_chunk(usage(prompt_tokens, completion, sum(cached.values()))))
        yield "data: [DONE]\n\n"

    # ---- gRPC (method names = RPC names of inference.proto) -----------------------------------

    async def Complete(self, request: Any, grpc_context: Any = None) -> Any:
        try:
            started = await self._grpc_start(request, grpc_context)
            (c,), _ = await self._collect(started, 1, echo=False)
        except APIError as e:
            _grpc_error(grpc_context, e)
            return pb.GenerateResponse()
        return pb.GenerateResponse(
            text=c.text, token_ids=c.token_ids, finish_reason=c.finish_reason or "", model=self.model_name,
            usage=_usage_pb(started[0].head.prompt_tokens, len(c.token_ids)),
        )  # fmt: skip

    async def Generate(self, request: Any, grpc_context: Any = None) -> AsyncIterator[Any]:
        try:
            started = await self._grpc_start(request, grpc_context)
            completion = 0
            async for _, u in self._merged(started):
                completion += len(u.token_ids)
                last = bool(u.finish_reason)
                yield pb.GenerateResponse(
                    text=u.text, token_ids=u.token_ids, finish_reason=u.finish_reason or "",
                    model=self.model_name,
                    usage=_usage_pb(started[0].head.prompt_tokens, completion) if last else None,
                )  # fmt: skip
        except APIError as e:
            # A stream's status reaches the client only through an exception once the code is set.
            _grpc_error(grpc_context, e)
            raise

    async def ListModels(self, request: Any, grpc_context: Any = None) -> Any:
        try:
            _grpc_authorize(grpc_context, self.serving.api_key)
        except APIError as e:
            _grpc_error(grpc_context, e)
            return pb.ListModelsResponse()
        return pb.ListModelsResponse(models=[self.model_name])

    async def Health(self, request: Any, grpc_context: Any = None) -> Any:
        try:
            await asyncio.wait_for(self.llm.health.remote(), timeout=HEALTH_TIMEOUT_S)
        except Exception as e:
            return pb.HealthResponse(healthy=False, detail=str(e) or type(e).__name__)
        return pb.HealthResponse(healthy=True, detail="ok")

    async def Tokenize(self, request: Any, grpc_context: Any = None) -> Any:
        try:
            _grpc_authorize(grpc_context, self.serving.api_key)
            self._check_model(request.model or self.model_name)
            data: dict[str, Any] = {"add_special_tokens": not request.no_special_tokens}
            if request.messages:
                data["messages"] = [{"role": m.role, "content": m.content} for m in request.messages]
            else:
                data["prompt"] = request.prompt
            answer = _refused(await self.llm.tokenize.remote(_validated(TokenizeCall, data)))
        except APIError as e:
            _grpc_error(grpc_context, e)
            return pb.TokenizeResponse()
        return pb.TokenizeResponse(tokens=answer["tokens"], count=answer["count"],
                                   max_model_len=answer["max_model_len"])  # fmt: skip

    async def Detokenize(self, request: Any, grpc_context: Any = None) -> Any:
        try:
            _grpc_authorize(grpc_context, self.serving.api_key)
            self._check_model(request.model or self.model_name)
            answer = _refused(await self.llm.detokenize.remote(list(request.tokens)))
        except APIError as e:
            _grpc_error(grpc_context, e)
            return pb.DetokenizeResponse()
        return pb.DetokenizeResponse(text=answer["prompt"])

    async def _grpc_start(self, request: Any, grpc_context: Any) -> list[_Started]:
        _grpc_authorize(grpc_context, self.serving.api_key)
        data: dict[str, Any] = {"model": request.model or self.model_name}
        chat = len(request.messages) > 0
        if chat:
            data["messages"] = [{"role": m.role, "content": m.content} for m in request.messages]
        else:
            data["prompt"] = list(request.prompt_token_ids) if request.prompt_token_ids else request.prompt
        for name in ("max_tokens", "temperature", "top_p", "top_k", "seed", *_GRPC_CONTROLS):
            if request.HasField(name):
                data[name] = getattr(request, name)
        if request.stop:
            data["stop"] = list(request.stop)
        if request.logit_bias:
            data["logit_bias"] = {str(t): b for t, b in request.logit_bias.items()}
        given = {"json": request.json_schema, "regex": request.regex, "choice": list(request.choice),
                 "grammar": request.grammar}  # fmt: skip
        given = {key: value for key, value in given.items() if value}
        if given:
            data["structured_outputs"] = given  # more than one: refused, naming the second
        if request.json_object:
            data["response_format"] = {"type": "json_object"}
        started, _ = await self._start(_parse(data, chat))
        return started


# GenerateRequest's optional sampling controls, named as the HTTP fields.
_GRPC_CONTROLS = ("presence_penalty", "frequency_penalty", "repetition_penalty", "min_p", "min_tokens")


async def _head(gen: Any) -> Head | Failure:
    """The model copy's first answer to a request (its prompt size, or its error)."""
    try:
        first: Head | Failure = await gen.__anext__()
    except StopAsyncIteration as e:
        raise APIError(503, "the model copy ended the request without an answer", code="engine_unavailable") from e
    except Exception as e:
        raise _unavailable(e) from e
    return first


async def _guarded(gen: Any) -> AsyncIterator[Update | Failure]:
    """A model copy's stream, with its failures (replica died, Serve's queue full) as 503s, not 500s."""
    try:
        async for item in gen:
            yield item
    except Exception as e:
        raise _unavailable(e) from e


def _unavailable(e: Exception) -> APIError:
    if isinstance(e, BackPressureError):
        return APIError(429, "every model copy is at capacity (queue full); retry shortly", code="overloaded")
    logger.warning("a model copy failed a request: %s", type(e).__name__)
    return APIError(503, "the model copy serving this request is unavailable; retry shortly", code="engine_unavailable")


def _parse(data: dict[str, Any], chat: bool) -> OpenAIRequest:
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


class _Tokens(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    tokens: list[int]


def _validated(model: type[M], data: dict[str, Any]) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise validation_error(e) from e


def _refused(answer: dict[str, Any]) -> dict[str, Any]:
    """A model copy's answer to a tokenizer call, or its refusal raised as an APIError."""
    if "error" in answer:
        raise Failure.model_validate(answer["error"]).error()
    return answer


def _answer(answer: dict[str, Any]) -> Response:
    try:
        return JSONResponse(_refused(answer))
    except APIError as e:
        return _error(e)


def _error(e: APIError, retry_after_s: int = 10) -> JSONResponse:
    """The OpenAI error body; 429 and 503 say when to come back (`Retry-After`)."""
    headers = {"Retry-After": str(retry_after_s)} if e.status in (429, 503) else None
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def _usage_pb(prompt: int, completion: int) -> Any:
    return pb.Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


_GRPC_CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 404: grpc.StatusCode.NOT_FOUND,
               401: grpc.StatusCode.UNAUTHENTICATED, 429: grpc.StatusCode.RESOURCE_EXHAUSTED,
               500: grpc.StatusCode.INTERNAL, 503: grpc.StatusCode.UNAVAILABLE}  # fmt: skip


def _grpc_authorize(ctx: Any, api_key: str | None) -> None:
    """The API key travels as gRPC metadata `authorization: Bearer <key>` (Health needs none)."""
    if api_key is None:
        return
    metadata = dict(ctx.invocation_metadata()) if ctx is not None else {}
    if metadata.get("authorization", "") != f"Bearer {api_key}":
        raise APIError(401, "missing or wrong API key (metadata authorization: Bearer <key>)")


def _grpc_error(ctx: Any, e: APIError) -> None:
    if ctx is not None:
        ctx.set_code(_GRPC_CODES.get(e.status, grpc.StatusCode.INVALID_ARGUMENT))
        ctx.set_details(f"{e.param}: {e.message}" if e.param and not e.message.startswith(e.param) else e.message)
