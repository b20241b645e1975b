"""The Serve ingress: OpenAI-compatible HTTP routes and the gRPC methods of `inference.proto`.

Routes: `/v1/completions`, `/v1/chat/completions` (JSON and SSE), `/v1/models`, `/health`,
`/metrics`. It parses and validates request bodies (`cluster/openai_protocol.py`), enforces the
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
from typing import Any

import grpc
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import ValidationError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from cluster.metrics import Metrics
from cluster.openai_protocol import APIError, ChatCompletionRequest, CompletionRequest, validation_error
from cluster.proto import inference_pb2
from cluster.serve_config import ServeConfig
from cluster.serve_messages import Failure, GenerateCall, Head, Update

logger = logging.getLogger(__name__)
pb: Any = inference_pb2  # generated module: its message classes are made at import time

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
CHAT_DEFAULT_MAX_TOKENS = 256
HEALTH_TIMEOUT_S = 5.0  # /health answers within this, well inside a load balancer's probe timeout

OpenAIRequest = CompletionRequest | ChatCompletionRequest


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

    async def _openai(self, request: Request, chat: bool) -> Response:
        route = "chat" if chat else "completions"
        retry = self.serving.retry_after_s
        try:
            req = _parse(await self._json_body(request), chat)
            gen, call, head = await self._start(req)
        except APIError as e:
            self.counters.requests.labels(route, str(e.status)).inc()
            return _error(e, retry)
        self.counters.requests.labels(route, "200").inc()
        self.counters.prompt_tokens.inc(head.prompt_tokens)
        meta = _Meta(call.id, self.model_name, head.replica, head.prompt_tokens, chat)
        if req.stream:
            return StreamingResponse(self._sse(gen, meta, req.include_usage), media_type="text/event-stream")
        try:
            text, tokens, reason, logprobs = await self._collect(gen)
        except APIError as e:
            return _error(e, retry)
        return JSONResponse(meta.full(text, tokens, reason, logprobs))

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

    async def _start(self, req: OpenAIRequest) -> tuple[Any, GenerateCall, Head]:
        """Send a validated request to a model copy: its stream, the call, and the copy's `Head`."""
        if req.model != self.model_name:
            raise APIError(404, f"model {req.model!r} does not exist; this server has {self.model_name!r}",
                           param="model", code="model_not_found")  # fmt: skip
        call = _call(req)
        gen: Any = self.llm.options(stream=True).stream.remote(call)
        head = await _head(gen)
        if isinstance(head, Failure):
            raise head.error()
        return gen, call, head

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

    async def _collect(self, gen: Any) -> tuple[str, list[int], str | None, list[float]]:
        text, tokens, logprobs, reason = "", [], [], None
        async for u in self._updates(gen):
            text += u.text
            tokens += u.token_ids
            logprobs += u.logprobs
            reason = u.finish_reason or reason
        return text, tokens, reason, logprobs

    async def _sse(self, gen: Any, meta: _Meta, include_usage: bool) -> AsyncIterator[str]:
        completion = 0
        if meta.chat:
            yield _sse(meta.chunk(delta={"role": "assistant", "content": ""}))
        try:
            async for u in self._updates(gen):
                completion += len(u.token_ids)
                if u.text or u.finish_reason:
                    yield _sse(meta.chunk(text=u.text, reason=u.finish_reason))
        except APIError as e:
            yield _sse(e.body())
            return
        if include_usage:
            yield _sse(meta.usage_chunk(completion))
        yield "data: [DONE]\n\n"

    # ---- gRPC (method names = RPC names of inference.proto) -----------------------------------

    async def Complete(self, request: Any, grpc_context: Any = None) -> Any:
        try:
            gen, head = await self._grpc_start(request, grpc_context)
            text, tokens, reason, _ = await self._collect(gen)
        except APIError as e:
            _grpc_error(grpc_context, e)
            return pb.GenerateResponse()
        return pb.GenerateResponse(
            text=text, token_ids=tokens, finish_reason=reason or "", model=self.model_name,
            usage=_usage_pb(head.prompt_tokens, len(tokens)),
        )  # fmt: skip

    async def Generate(self, request: Any, grpc_context: Any = None) -> AsyncIterator[Any]:
        try:
            gen, head = await self._grpc_start(request, grpc_context)
            completion = 0
            async for u in self._updates(gen):
                completion += len(u.token_ids)
                last = bool(u.finish_reason)
                yield pb.GenerateResponse(
                    text=u.text, token_ids=u.token_ids, finish_reason=u.finish_reason or "",
                    model=self.model_name, usage=_usage_pb(head.prompt_tokens, completion) if last else None,
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

    async def _grpc_start(self, request: Any, grpc_context: Any) -> tuple[Any, Head]:
        _grpc_authorize(grpc_context, self.serving.api_key)
        data: dict[str, Any] = {"model": request.model or self.model_name}
        chat = len(request.messages) > 0
        if chat:
            data["messages"] = [{"role": m.role, "content": m.content} for m in request.messages]
        else:
            data["prompt"] = list(request.prompt_token_ids) if request.prompt_token_ids else request.prompt
        for name in ("max_tokens", "temperature", "top_p", "top_k", "seed"):
            if request.HasField(name):
                data[name] = getattr(request, name)
        if request.stop:
            data["stop"] = list(request.stop)
        gen, _, head = await self._start(_parse(data, chat))
        return gen, head


class _Meta:
    """What every response of one request shares, and its OpenAI JSON shapes."""

    def __init__(self, request_id: str, model: str, replica: str, prompt_tokens: int, chat: bool) -> None:
        self.id = ("chatcmpl-" if chat else "cmpl-") + request_id
        self.model, self.replica, self.prompt_tokens, self.chat = model, replica, prompt_tokens, chat
        self.created = int(time.time())

    def _base(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": self.replica}  # fmt: skip

    def usage(self, completion: int) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion}  # fmt: skip

    def full(self, text: str, tokens: list[int], reason: str | None, logprobs: list[float]) -> dict[str, Any]:
        if self.chat:
            choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text}}
            body = self._base("chat.completion")
        else:
            choice = {"index": 0, "text": text}
            body = self._base("text_completion")
        choice["finish_reason"] = reason
        choice["logprobs"] = {"token_logprobs": logprobs, "token_ids": tokens} if logprobs else None
        return body | {"choices": [choice], "usage": self.usage(len(tokens))}

    def chunk(self, text: str = "", reason: str | None = None, delta: dict[str, Any] | None = None) -> dict[str, Any]:
        if self.chat:
            choice: dict[str, Any] = {"index": 0, "delta": delta if delta is not None else {"content": text}}
            body = self._base("chat.completion.chunk")
        else:
            choice = {"index": 0, "text": text, "logprobs": None}
            body = self._base("text_completion")
        choice["finish_reason"] = reason
        return body | {"choices": [choice]}

    def usage_chunk(self, completion: int) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return self._base(obj) | {"choices": [], "usage": self.usage(completion)}


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


def _call(req: OpenAIRequest) -> GenerateCall:
    """The request as the model copy receives it."""
    if isinstance(req, ChatCompletionRequest):
        return GenerateCall(id=uuid.uuid4().hex, messages=req.messages, params=req.sampling(CHAT_DEFAULT_MAX_TOKENS))
    return GenerateCall(id=uuid.uuid4().hex, prompt=req.prompt, params=req.sampling(COMPLETION_DEFAULT_MAX_TOKENS))


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
