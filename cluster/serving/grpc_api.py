"""The gRPC service of `cluster/proto/inference.proto`: each RPC over the same way to the model
copies as the HTTP routes (`cluster.serving.streams`). Ray Serve calls the ingress deployment's
methods of the RPCs' names; `Ingress` hands each to the `GrpcApi` here."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc

from cluster.proto import inference_pb2
from cluster.serving.config import ServingSection
from cluster.serving.messages import TokenizeCall
from cluster.serving.openai_protocol import APIError
from cluster.serving.streams import HEALTH_TIMEOUT_S, ModelCopies, Started, Tally, parse, refused, validated

pb: Any = inference_pb2  # generated module: its message classes are made at import time


class GrpcApi:
    """The RPCs (names as in inference.proto), with the API key as metadata."""

    def __init__(self, copies: ModelCopies, serving: ServingSection) -> None:
        self.copies = copies
        self.serving = serving

    async def Complete(self, request: Any, grpc_context: Any = None) -> Any:
        try:
            started = await self._grpc_start(request, grpc_context)
            (c,) = (await self.copies.collect(started, 1, echo=False)).choices()
        except APIError as e:
            _grpc_error(grpc_context, e)
            return pb.GenerateResponse()
        return pb.GenerateResponse(
            text=c.text, token_ids=c.token_ids, finish_reason=c.finish_reason or "", model=self.copies.model_name,
            usage=_usage_pb(started[0].head.prompt_tokens, len(c.token_ids)),
        )  # fmt: skip

    async def Generate(self, request: Any, grpc_context: Any = None) -> AsyncIterator[Any]:
        try:
            started = await self._grpc_start(request, grpc_context)
            tally = Tally(1, echo=False)
            async for s, u in self.copies.merged(started):
                tally.add(s, u)
                last = bool(u.finish_reason)
                yield pb.GenerateResponse(
                    text=u.text, token_ids=u.token_ids, finish_reason=u.finish_reason or "",
                    model=self.copies.model_name,
                    usage=_usage_pb(started[0].head.prompt_tokens, tally.completion_tokens) if last else None,
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
        return pb.ListModelsResponse(models=[self.copies.model_name])

    async def Health(self, request: Any, grpc_context: Any = None) -> Any:
        try:
            await asyncio.wait_for(self.copies.llm.health.remote(), timeout=HEALTH_TIMEOUT_S)
        except Exception as e:
            return pb.HealthResponse(healthy=False, detail=str(e) or type(e).__name__)
        return pb.HealthResponse(healthy=True, detail="ok")

    async def Tokenize(self, request: Any, grpc_context: Any = None) -> Any:
        try:
            _grpc_authorize(grpc_context, self.serving.api_key)
            self.copies.check_model(request.model or self.copies.model_name)
            data: dict[str, Any] = {"add_special_tokens": not request.no_special_tokens}
            if request.messages:
                data["messages"] = [{"role": m.role, "content": m.content} for m in request.messages]
            else:
                data["prompt"] = request.prompt
            answer = refused(await self.copies.llm.tokenize.remote(validated(TokenizeCall, data)))
        except APIError as e:
            _grpc_error(grpc_context, e)
            return pb.TokenizeResponse()
        return pb.TokenizeResponse(tokens=answer["tokens"], count=answer["count"],
                                   max_model_len=answer["max_model_len"])  # fmt: skip

    async def Detokenize(self, request: Any, grpc_context: Any = None) -> Any:
        try:
            _grpc_authorize(grpc_context, self.serving.api_key)
            self.copies.check_model(request.model or self.copies.model_name)
            answer = refused(await self.copies.llm.detokenize.remote(list(request.tokens)))
        except APIError as e:
            _grpc_error(grpc_context, e)
            return pb.DetokenizeResponse()
        return pb.DetokenizeResponse(text=answer["prompt"])

    async def _grpc_start(self, request: Any, grpc_context: Any) -> list[Started]:
        _grpc_authorize(grpc_context, self.serving.api_key)
        data: dict[str, Any] = {"model": request.model or self.copies.model_name}
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
        started, _ = await self.copies.start(parse(data, chat))
        return started


# GenerateRequest's optional sampling controls, named as the HTTP fields.
_GRPC_CONTROLS = ("presence_penalty", "frequency_penalty", "repetition_penalty", "min_p", "min_tokens")


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
