"""The Ray Serve application: an OpenAI-compatible HTTP + gRPC ingress in front of model copies.

    app = build_app(ServeConfig.load("configs/tiny.yaml"))
    serve.run(app)

`LLMServer`: one replica = one model copy. Its placement-group bundles (bundle 0 for the replica,
then one per worker) are derived from the config, so Serve's autoscaling adds whole copies. It
owns the tokenizer and the `LLM`; it answers with plain dicts (errors included), so nothing but
data crosses the process boundary.
`Ingress`: FastAPI routes (`/v1/completions`, `/v1/chat/completions`, `/v1/models`, `/health`,
`/metrics`) and the gRPC methods of `cluster/proto/inference.proto`. It validates requests,
enforces the API key and body size, turns results into OpenAI JSON or SSE, and cancels the
model copy's work when a client goes away.
"""

# No `from __future__ import annotations` here: FastAPI reads the route methods' annotations
# (`request: Request`) at runtime, and string annotations of a class built inside a function
# cannot be resolved.
import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import ValidationError
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from actors.worker import rss_bytes
from cluster.engine import EngineError, SamplingParams
from cluster.llm import LLM
from cluster.metrics import Metrics
from cluster.openai_protocol import APIError, ChatCompletionRequest, CompletionRequest, validation_error
from cluster.proto import inference_pb2
from cluster.serve_config import ServeConfig, ensure_checkpoint
from model.tokenizer import ChatFormatError

logger = logging.getLogger(__name__)
pb: Any = inference_pb2  # generated module: its message classes are made at import time

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
CHAT_DEFAULT_MAX_TOKENS = 256
HEALTH_TIMEOUT_S = 5.0  # /health answers within this, well inside a load balancer's probe timeout


class LLMServer:
    """One model copy: its workers run in this replica's placement group, bundles 1..N."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        ensure_checkpoint(config)  # local mode under `serve run`: the first replica writes it
        eng, clu = config.engine, config.cluster
        pg = ray.util.get_current_placement_group()
        self.llm = LLM(
            config.model.checkpoint,
            attention_shards=clu.attention_shards,
            routers=clu.routers,
            expert_groups=clu.expert_groups,
            device=clu.device,
            dtype=config.model.dtype,
            block_size=eng.block_size,
            kv_cache_bytes=int(eng.kv_cache_gb * (1 << 30)),
            max_batched_tokens=eng.max_batched_tokens,
            max_seqs=eng.max_seqs,
            max_model_len=eng.max_model_len,
            placement_timeout_s=clu.placement_timeout_s,
            torch_threads=clu.torch_threads,
            worker_resources=clu.bundle_resources(),
            step_timeout_s=eng.step_timeout_s,
            device_memory_bytes=int(clu.gpu_memory_gb * 1e9),
            placement=pg,
            bundle_offset=1 if pg is not None else 0,
        )
        self.max_model_len = self.llm.engine.max_model_len
        self.token_budget = int(self.llm.engine.kv_capacity_tokens * eng.kv_overcommit)
        self.demand = 0  # prompt + max_tokens of the requests admitted and not finished
        try:
            self.replica = serve.get_replica_context().replica_id.unique_id
        except Exception:  # outside Serve (tests constructing it directly)
            self.replica = "local"

    def _prompt(self, req: dict[str, Any]) -> tuple[list[int], str]:
        """Token ids of a request and the name of the field they came from."""
        tok = self.llm.tokenizer
        if req["kind"] == "chat":
            try:
                return tok.encode_chat(req["messages"]), "messages"
            except ChatFormatError as e:
                raise APIError(400, str(e), param="messages", code="invalid_value") from e
        prompt = req["prompt"]
        if isinstance(prompt, str):
            return tok.encode(prompt), "prompt"
        bad = [t for t in prompt if not 0 <= t < self.llm.config.vocab_size]
        if bad:
            raise APIError(400, f"token ids {bad[:5]} are outside the vocabulary", param="prompt", code="invalid_value")
        return list(prompt), "prompt"

    def _admit(self, req: dict[str, Any]) -> tuple[list[int], SamplingParams]:
        prompt, field = self._prompt(req)
        params = SamplingParams.model_validate(req["params"])
        if len(prompt) >= self.max_model_len:
            raise APIError(
                400,
                f"the prompt is {len(prompt)} tokens; this model's context is {self.max_model_len}",
                param=field,
                code="context_length_exceeded",
            )
        if len(prompt) + params.max_tokens > self.max_model_len:
            raise APIError(
                400,
                f"max_tokens ({params.max_tokens}) + the prompt ({len(prompt)} tokens) exceeds the context "
                f"({self.max_model_len}); ask for at most {self.max_model_len - len(prompt)}",
                param="max_tokens",
                code="context_length_exceeded",
            )
        return prompt, params

    async def stream(self, req: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """First {"prompt_tokens", "replica"} (or {"error"}), then one dict per update."""
        need = 0
        try:
            prompt, params = self._admit(req)
            need = len(prompt) + params.max_tokens
            if self.demand + need > self.token_budget and self.demand > 0:
                need = 0
                raise APIError(429, "this model copy is at capacity (KV cache and queue); retry shortly",
                               code="overloaded")  # fmt: skip
            self.demand += need
            updates = self.llm.stream(prompt, params, request_id=f"{req['id']}")
            yield {"prompt_tokens": len(prompt), "replica": self.replica}
            async for out in updates:
                yield {
                    "text": out.new_text,
                    "token_ids": out.new_token_ids,
                    "finish_reason": out.finish_reason,
                    "logprobs": out.logprobs[-len(out.new_token_ids) :] if out.logprobs and out.new_token_ids else [],
                }
        except APIError as e:
            yield {"error": e.to_dict()}
        except ValueError as e:  # refused by the engine (e.g. more KV blocks than a shard has)
            yield {"error": APIError(400, str(e), param="max_tokens", code="invalid_value").to_dict()}
        except EngineError as e:
            yield {"error": APIError(503, str(e), code="engine_unavailable").to_dict()}
        finally:
            self.demand -= need

    def stats(self) -> dict[str, Any]:
        s = self.llm.stats()
        return s | {
            "replica": self.replica,
            "expert_tokens": self.llm.expert_token_counts().tolist(),
            "admitted_tokens": self.demand,
            "rss_bytes": rss_bytes(),
        }

    def health(self) -> str:
        """This copy's id while its engine can serve; raises once a worker has died, so `/health`
        says 503 at once instead of waiting for Serve to notice."""
        self.check_health()
        return self.replica

    def check_health(self) -> None:
        """Serve calls this periodically; raising marks the replica unhealthy, and Serve replaces it
        with a fresh one (new workers, weights reloaded) while the others keep serving."""
        if self.llm.error:
            raise RuntimeError(self.llm.error)

    def workers(self) -> list[dict[str, Any]]:
        """Where each worker of this model copy runs: name, pid, node, GPUs."""
        backend: Any = self.llm.backend
        return backend.call_all("where") if hasattr(backend, "call_all") else []

    def __del__(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is not None:
            llm.shutdown()


def build_app(config: ServeConfig) -> Any:
    """The Serve `Application` for a config: an ingress bound to an autoscaled `LLMServer`."""
    shape = config.model_shape()
    srv = config.serving
    llm_deployment: Any = serve.deployment(
        LLMServer,
        name="LLMServer",
        placement_group_bundles=config.replica_bundles(shape.num_experts),
        placement_group_strategy=config.cluster.placement_strategy,
        ray_actor_options={"num_cpus": 0},  # bundle 0 is the replica's; its CPU is for the engine loop
        max_ongoing_requests=srv.max_ongoing_requests,
        max_queued_requests=srv.max_queued_requests,
        autoscaling_config={
            "min_replicas": srv.min_replicas,
            "max_replicas": srv.max_replicas,
            "target_ongoing_requests": srv.target_ongoing_requests,
        },
        health_check_period_s=srv.health_check_period_s,
        health_check_timeout_s=60,
    )
    ingress: Any = serve.deployment(_make_ingress(config), name="Ingress", max_ongoing_requests=10_000)
    return ingress.bind(llm_deployment.bind(config))


def app_builder(args: dict[str, Any]) -> Any:
    """For Serve config files: `import_path: cluster.serve:app_builder`, `args: {config: path}`."""
    return build_app(ServeConfig.load(args["config"]))


def _make_ingress(config: ServeConfig) -> type:
    app = FastAPI(title="mixtral-cluster", version="0.1.0")
    srv = config.serving
    model_name = config.model.name

    @app.middleware("http")
    async def guard(request: Request, call_next: Any) -> Response:
        if srv.api_key and request.url.path != "/health":
            if request.headers.get("authorization", "") != f"Bearer {srv.api_key}":
                return _error(APIError(401, "missing or wrong API key (Authorization: Bearer <key>)"))
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > srv.max_body_bytes):
            return _error(APIError(413, f"request body over {srv.max_body_bytes} bytes", code="body_too_large"))
        return await call_next(request)

    @serve.ingress(app)
    class Ingress:
        def __init__(self, llm: DeploymentHandle[Any]) -> None:
            self.llm = llm
            self.counters = Metrics()

        # ---- HTTP ---------------------------------------------------------------------------

        @app.get("/health")
        async def health(self) -> Response:
            try:
                replica = await asyncio.wait_for(self.llm.health.remote(), timeout=HEALTH_TIMEOUT_S)
            except Exception as e:
                return JSONResponse({"status": "unhealthy", "detail": str(e) or type(e).__name__}, status_code=503)
            return JSONResponse({"status": "ok", "replica": replica})

        @app.get("/metrics")
        async def metrics(self) -> Response:
            try:
                self.counters.observe_engine(await asyncio.wait_for(self.llm.stats.remote(), timeout=10))
            except Exception as e:
                logger.warning("engine stats unavailable for /metrics: %s", e)
            return PlainTextResponse(self.counters.render(), media_type="text/plain; version=0.0.4")

        @app.get("/v1/models")
        async def models(self) -> Response:
            self.counters.requests.labels("models", "200").inc()
            card = {"id": model_name, "object": "model", "created": 0, "owned_by": "mixtral-cluster"}
            return JSONResponse({"object": "list", "data": [card]})

        @app.post("/v1/completions")
        async def completions(self, request: Request) -> Response:
            return await self._openai(request, chat=False)

        @app.post("/v1/chat/completions")
        async def chat_completions(self, request: Request) -> Response:
            return await self._openai(request, chat=True)

        async def _openai(self, request: Request, chat: bool) -> Response:
            route = "chat" if chat else "completions"
            try:
                body = await request.body()
                if len(body) > srv.max_body_bytes:
                    raise APIError(413, f"request body over {srv.max_body_bytes} bytes", code="body_too_large")
                try:
                    data = json.loads(body)
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    raise APIError(400, f"the body is not valid JSON: {e}", code="invalid_json") from e
                if not isinstance(data, dict):
                    raise APIError(400, "the body must be a JSON object", code="invalid_json")
                req = _parse(data, chat)
                if req.model != model_name:
                    raise APIError(404, f"model {req.model!r} does not exist; this server has {model_name!r}",
                                   param="model", code="model_not_found")  # fmt: skip
                internal = _internal(req, chat)
                gen: Any = self.llm.options(stream=True).stream.remote(internal)
                head = await _head(gen)
                if "error" in head:
                    raise APIError.from_dict(head["error"])
            except APIError as e:
                self.counters.requests.labels(route, str(e.status)).inc()
                return _error(e, srv.retry_after_s)
            self.counters.requests.labels(route, "200").inc()
            self.counters.prompt_tokens.inc(head["prompt_tokens"])
            meta = _Meta(internal["id"], model_name, head["replica"], head["prompt_tokens"], chat)
            if req.stream:
                return StreamingResponse(self._sse(gen, meta, req.include_usage), media_type="text/event-stream")
            try:
                text, tokens, reason, logprobs = await self._collect(gen)
            except APIError as e:
                return _error(e, srv.retry_after_s)
            return JSONResponse(meta.full(text, tokens, reason, logprobs))

        async def _updates(self, gen: Any) -> AsyncIterator[dict[str, Any]]:
            """Updates from the model copy, timed for the latency histograms; cancels it if abandoned."""
            start = last = time.monotonic()
            first = True
            try:
                async for update in _guarded(gen):
                    if "error" in update:
                        raise APIError.from_dict(update["error"])
                    now = time.monotonic()
                    if update["token_ids"]:
                        (self.counters.ttft if first else self.counters.itl).observe(now - (start if first else last))
                        first, last = False, now
                        self.counters.generated_tokens.inc(len(update["token_ids"]))
                    yield update
            finally:
                gen.cancel()  # a no-op once finished; aborts the request when the client has gone

        async def _collect(self, gen: Any) -> tuple[str, list[int], str | None, list[float]]:
            text, tokens, logprobs, reason = "", [], [], None
            async for u in self._updates(gen):
                text += u["text"]
                tokens += u["token_ids"]
                logprobs += u["logprobs"]
                reason = u["finish_reason"] or reason
            return text, tokens, reason, logprobs

        async def _sse(self, gen: Any, meta: "_Meta", include_usage: bool) -> AsyncIterator[str]:
            completion = 0
            if meta.chat:
                yield _sse(meta.chunk(delta={"role": "assistant", "content": ""}))
            try:
                async for u in self._updates(gen):
                    completion += len(u["token_ids"])
                    if u["text"] or u["finish_reason"]:
                        yield _sse(meta.chunk(text=u["text"], reason=u["finish_reason"]))
            except APIError as e:
                yield _sse(e.body())
                return
            if include_usage:
                yield _sse(meta.usage_chunk(completion))
            yield "data: [DONE]\n\n"

        # ---- gRPC (method names = RPC names of inference.proto) -------------------------------

        async def Complete(self, request: Any, grpc_context: Any = None) -> Any:
            try:
                gen, head = await self._grpc_start(request, grpc_context)
                text, tokens, reason, _ = await self._collect(gen)
            except APIError as e:
                _grpc_error(grpc_context, e)
                return pb.GenerateResponse()
            return pb.GenerateResponse(
                text=text, token_ids=tokens, finish_reason=reason or "", model=model_name,
                usage=_usage_pb(head["prompt_tokens"], len(tokens)),
            )  # fmt: skip

        async def Generate(self, request: Any, grpc_context: Any = None) -> AsyncIterator[Any]:
            try:
                gen, head = await self._grpc_start(request, grpc_context)
                completion = 0
                async for u in self._updates(gen):
                    completion += len(u["token_ids"])
                    last = bool(u["finish_reason"])
                    yield pb.GenerateResponse(
                        text=u["text"], token_ids=u["token_ids"], finish_reason=u["finish_reason"] or "",
                        model=model_name, usage=_usage_pb(head["prompt_tokens"], completion) if last else None,
                    )  # fmt: skip
            except APIError as e:
                # A stream's status reaches the client only through an exception once the code is set.
                _grpc_error(grpc_context, e)
                raise

        async def ListModels(self, request: Any, grpc_context: Any = None) -> Any:
            try:
                _grpc_authorize(grpc_context, srv.api_key)
            except APIError as e:
                _grpc_error(grpc_context, e)
                return pb.ListModelsResponse()
            return pb.ListModelsResponse(models=[model_name])

        async def Health(self, request: Any, grpc_context: Any = None) -> Any:
            try:
                await asyncio.wait_for(self.llm.health.remote(), timeout=HEALTH_TIMEOUT_S)
            except Exception as e:
                return pb.HealthResponse(healthy=False, detail=str(e) or type(e).__name__)
            return pb.HealthResponse(healthy=True, detail="ok")

        async def _grpc_start(self, request: Any, grpc_context: Any) -> tuple[Any, dict[str, Any]]:
            _grpc_authorize(grpc_context, srv.api_key)
            data: dict[str, Any] = {"model": request.model or model_name}
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
            req = _parse(data, chat)
            if req.model != model_name:
                raise APIError(404, f"model {req.model!r} does not exist; this server has {model_name!r}", "model")
            gen: Any = self.llm.options(stream=True).stream.remote(_internal(req, chat))
            head = await _head(gen)
            if "error" in head:
                raise APIError.from_dict(head["error"])
            return gen, head

    return Ingress


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


async def _head(gen: Any) -> dict[str, Any]:
    """The model copy's first answer to a request (its prompt size, or its error)."""
    try:
        first: dict[str, Any] = await gen.__anext__()
    except StopAsyncIteration as e:
        raise APIError(503, "the model copy ended the request without an answer", code="engine_unavailable") from e
    except Exception as e:
        raise _unavailable(e) from e
    return first


async def _guarded(gen: Any) -> AsyncIterator[dict[str, Any]]:
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


def _parse(data: dict[str, Any], chat: bool) -> CompletionRequest | ChatCompletionRequest:
    try:
        return (ChatCompletionRequest if chat else CompletionRequest).model_validate(data)
    except ValidationError as e:
        raise validation_error(e) from e


def _internal(req: CompletionRequest | ChatCompletionRequest, chat: bool) -> dict[str, Any]:
    """The plain-data request the model copy receives."""
    default = CHAT_DEFAULT_MAX_TOKENS if chat else COMPLETION_DEFAULT_MAX_TOKENS
    out: dict[str, Any] = {"id": uuid.uuid4().hex, "params": req.sampling(default).model_dump()}
    if isinstance(req, ChatCompletionRequest):
        out |= {"kind": "chat", "messages": [m.model_dump() for m in req.messages]}
    else:
        out |= {"kind": "completion", "prompt": req.prompt}
    return out


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
               503: grpc.StatusCode.UNAVAILABLE}  # fmt: skip


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
