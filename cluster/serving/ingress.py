"""The Serve ingress: OpenAI-compatible HTTP routes, and the gRPC methods of `inference.proto`.

Routes: `/v1/completions`, `/v1/chat/completions` (JSON and SSE), `/v1/models`, `/health`,
`/metrics`, vLLM's `/tokenize`, `/detokenize` and `/tokenizer_info`, `/admin/rebalance`. It
enforces the API key and the body size, parses and validates request bodies
(`cluster/serving/openai_protocol.py`), and turns the copies' answers into OpenAI JSON or SSE.
The way to the copies and back is `cluster.serving.streams` (shared with gRPC); the RPCs are
`cluster.serving.grpc_api`'s, which Ray Serve reaches through this class's methods of their
names. Serve builds the FastAPI app per replica from the config it was given
(`__serve_build_asgi_app__`), so the class lives at module level and holds no closure.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict
from ray.serve.handle import DeploymentHandle

from cluster.serving.config import ServeConfig
from cluster.serving.grpc_api import GrpcApi
from cluster.serving.messages import TokenizeCall
from cluster.serving.metrics import Metrics
from cluster.serving.openai_protocol import APIError, CompletionRequest
from cluster.serving.openai_responses import Reply, usage
from cluster.serving.streams import HEALTH_TIMEOUT_S, ModelCopies, Started, Tally, parse, refused, validated

logger = logging.getLogger(__name__)


class Ingress:
    def __init__(self, llm: DeploymentHandle[Any], config: ServeConfig) -> None:
        self.llm = llm
        self.serving = config.serving
        self.model_name = config.model.name
        self.counters = Metrics()
        self.copies = ModelCopies(llm, self.model_name, self.counters)
        self.grpc = GrpcApi(self.copies, self.serving)

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
            self.copies.check_model(data.get("model", self.model_name))
            call = validated(TokenizeCall, {k: v for k, v in data.items() if k != "model"})
            answer = await self.llm.tokenize.remote(call)
        except APIError as e:
            return _error(e)
        return _answer(answer)

    async def detokenize(self, request: Request) -> Response:
        """vLLM's route: `{"tokens": [...]}` -> `{"prompt": text}`."""
        try:
            data = await self._json_body(request)
            self.copies.check_model(data.get("model", self.model_name))
            tokens = validated(_Tokens, {"tokens": data.get("tokens")}).tokens
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
            req = parse(await self._json_body(request), chat)
            started, request_id = await self.copies.start(req)
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
            sse = self._sse(started, reply, Tally(req.choices, echo), prompt_tokens, req.include_usage)
            return StreamingResponse(sse, media_type="text/event-stream")
        try:
            tally = await self.copies.collect(started, req.choices, echo)
        except APIError as e:
            return _error(e, retry)
        body = reply.full(tally.choices(), usage(prompt_tokens, tally.completion_tokens, tally.cached_tokens))
        return JSONResponse(body)

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

    async def _sse(
        self, started: list[Started], reply: Reply, tally: Tally, prompt_tokens: int, include_usage: bool
    ) -> AsyncIterator[str]:
        try:
            async for s, u in self.copies.merged(started):
                index, first = tally.add(s, u)
                if first:  # a choice's first chunk: chat's role, a completion's echo
                    if reply.chat:
                        yield _sse(reply.chunk(index, delta={"role": "assistant", "content": ""}))
                    elif reply.echo:
                        yield _sse(reply.chunk(index, text=s.head.prompt_text, prompt=tally.prompt_logprobs(s)))
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
            yield _sse(reply.usage_chunk(usage(prompt_tokens, tally.completion_tokens, tally.cached_tokens)))
        yield "data: [DONE]\n\n"

    # ---- gRPC: Serve calls the methods named as inference.proto's RPCs -------------------------

    async def Complete(self, request: Any, grpc_context: Any = None) -> Any:
        return await self.grpc.Complete(request, grpc_context)

    async def Generate(self, request: Any, grpc_context: Any = None) -> AsyncIterator[Any]:
        async for response in self.grpc.Generate(request, grpc_context):
            yield response

    async def ListModels(self, request: Any, grpc_context: Any = None) -> Any:
        return await self.grpc.ListModels(request, grpc_context)

    async def Health(self, request: Any, grpc_context: Any = None) -> Any:
        return await self.grpc.Health(request, grpc_context)

    async def Tokenize(self, request: Any, grpc_context: Any = None) -> Any:
        return await self.grpc.Tokenize(request, grpc_context)

    async def Detokenize(self, request: Any, grpc_context: Any = None) -> Any:
        return await self.grpc.Detokenize(request, grpc_context)


class _Tokens(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    tokens: list[int]


def _answer(answer: dict[str, Any]) -> Response:
    try:
        return JSONResponse(refused(answer))
    except APIError as e:
        return _error(e)


def _error(e: APIError, retry_after_s: int = 10) -> JSONResponse:
    """The OpenAI error body; 429 and 503 say when to come back (`Retry-After`)."""
    headers = {"Retry-After": str(retry_after_s)} if e.status in (429, 503) else None
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"
