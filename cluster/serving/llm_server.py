"""`LLMServer`: the Serve deployment whose replica is one model copy.

Its workers run in the replica's placement group (bundle 0 is the replica itself, then one per
worker; `ServeConfig.replica_bundles`), so Serve's autoscaling adds whole copies. It owns the
`LLM` (engine, tokenizer, workers), admits requests against the copy's KV budget, and answers
the ingress with the typed messages of `cluster/serving/messages.py`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import ray
from ray import serve

from actors.worker import rss_bytes
from cluster.engine.backend import EngineError, RebalanceUnavailable
from cluster.engine.request import RequestError, RequestFailed, RequestOutput, check_token_ids
from cluster.llm import LLM
from cluster.serving.config import ServeConfig
from cluster.serving.messages import Failure, GenerateCall, Head, Logprob, TokenizeCall, Update, token_text
from cluster.serving.openai_protocol import APIError
from cluster.serving.tool_calls import ToolCallReader, constrain
from protocol.step import TokenLogprobs


class LLMServer:
    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        pg = ray.util.get_current_placement_group()
        # Under `serve run` in local mode the first replica writes the seeded checkpoint (LLM does).
        self.llm = LLM(config, placement=pg, bundle_offset=1 if pg is not None else 0)
        self.token_budget = int(self.llm.engine.kv_capacity_tokens * config.engine.kv_overcommit)
        self.demand = 0  # prompt + max_tokens of the requests admitted and not finished
        try:
            self.replica = serve.get_replica_context().replica_id.unique_id
        except Exception:  # outside Serve (tests constructing it directly)
            self.replica = "local"

    async def stream(self, call: GenerateCall) -> AsyncIterator[Head | Update | Failure]:
        """First a `Head` (or a `Failure`), then an `Update` per engine step and choice (or a `Failure`)."""
        need = 0
        try:
            params, readers = call.params, None
            if call.messages is not None:
                tools = [t.model_dump(exclude_none=True) for t in call.tools or []]
                tool_calls_id = self.llm.tokenizer.tool_calls_id if self.llm.tokenizer is not None else None
                params = constrain(params, call.tools, call.tool_choice, call.parallel_tool_calls, tool_calls_id)
                prompt = self.llm.encode_chat([m.mistral() for m in call.messages], tools)
                if tools and call.tool_choice != "none":
                    assert tool_calls_id is not None  # constrain refused tools without it
                    readers = {i: ToolCallReader(tool_calls_id) for i in range(params.n)}
            else:
                assert call.prompt is not None  # GenerateCall holds one or the other
                prompt = self.llm.encode(call.prompt)
            request = self.llm.check(prompt, params)
            need = len(prompt) + params.n * params.max_tokens
            if self.demand + need > self.token_budget and self.demand > 0:
                need = 0
                raise APIError(429, "this model copy is at capacity (KV cache and queue); retry shortly",
                               code="overloaded")  # fmt: skip
            self.demand += need
            echoed = "" if not call.echo else call.prompt if isinstance(call.prompt, str) else self.llm.decode(prompt)
            updates = await self.llm.open_stream(request, request_id=call.id)
            try:
                yield Head(prompt_tokens=len(prompt), replica=self.replica, prompt_text=echoed)
                scored = False
                async for out in updates:
                    update = self._update(out, prompt, report_prompt=not scored)
                    yield readers[out.index].read(update) if readers is not None else update
                    scored = scored or out.prompt_logprobs is not None
            finally:
                await updates.aclose()  # the client went away: abort the request, free its blocks
        except RequestError as e:
            param = "messages" if call.chat and e.param == "prompt" else e.param  # the field the client sent
            yield Failure(status=400, message=e.message, param=param, code=e.code)
        except APIError as e:
            yield Failure.of(e)
        except RequestFailed as e:  # this request alone; the copy serves on
            yield Failure(status=500, message=str(e), code="request_failed")
        except EngineError as e:
            yield Failure(status=503, message=str(e), code="engine_unavailable")
        finally:
            self.demand -= need

    def _update(self, out: RequestOutput, prompt: list[int], report_prompt: bool) -> Update:
        new = out.logprobs[len(out.token_ids) - len(out.new_token_ids) :] if out.logprobs else []
        prompt_logprobs = None
        if report_prompt and out.prompt_logprobs is not None:  # the first position has no logprob
            prompt_logprobs = [self._logprob(t, e) for t, e in zip(prompt, out.prompt_logprobs, strict=True)]
        return Update(
            index=out.index, text=out.new_text, token_ids=out.new_token_ids, finish_reason=out.finish_reason,
            logprobs=[self._logprob(e.token, e) for e in new], prompt_logprobs=prompt_logprobs,
            cached_tokens=out.cached_tokens,
        )  # fmt: skip

    def _logprob(self, token: int, entry: TokenLogprobs | None) -> Logprob:
        text, raw = token_text(self.llm.tokenizer, token)
        if entry is None:
            return Logprob(token=text, bytes=raw, logprob=None)
        top = [(*token_text(self.llm.tokenizer, t), lp) for t, lp in entry.top]
        return Logprob(token=text, bytes=raw, logprob=entry.logprob, top=top)

    def tokenize(self, call: TokenizeCall) -> dict[str, Any]:
        """vLLM's /tokenize answer; `Failure` data (a dict with "error") for what cannot be tokenized."""
        try:
            if call.messages is not None:
                tools = [t.model_dump(exclude_none=True) for t in call.tools or []]
                tokens = self.llm.encode_chat([m.mistral() for m in call.messages], tools)
            else:
                assert call.prompt is not None
                tokens = self.llm.encode(call.prompt)
                tokens = tokens if call.add_special_tokens else tokens[1:]  # encode puts a bos first
        except RequestError as e:
            return {"error": Failure(status=400, message=e.message, param=e.param, code=e.code).model_dump()}
        return {"count": len(tokens), "max_model_len": self.llm.engine.max_model_len, "tokens": tokens}

    def detokenize(self, tokens: list[int]) -> dict[str, Any]:
        try:
            check_token_ids(tokens, self.llm.model_config.vocab_size, "tokens")
            return {"prompt": self.llm.decode(tokens)}
        except RequestError as e:
            return {"error": Failure(status=400, message=e.message, param=e.param, code=e.code).model_dump()}

    def tokenizer_info(self) -> dict[str, Any]:
        """What a client needs to tokenize as this server does (vLLM's /tokenizer_info)."""
        tok = self.llm.tokenizer
        return {
            "tokenizer_class": "sentencepiece" if tok is not None else None,
            "bos_token": tok.sp.id_to_piece(tok.bos_id) if tok is not None else None,
            "eos_token": tok.sp.id_to_piece(tok.eos_id) if tok is not None else None,
            "pad_token": None,
            "model_max_length": self.llm.engine.max_model_len,
            "vocab_size": self.llm.model_config.vocab_size,
        }

    def stats(self) -> dict[str, Any]:
        s = self.llm.stats()
        return s | {
            "replica": self.replica,
            "expert_tokens": self.llm.expert_token_counts().tolist(),
            "admitted_tokens": self.demand,
            "rss_bytes": rss_bytes(),
            "recoveries": list(self.llm.backend.recoveries),
        }

    def rebalance(self) -> dict[str, Any]:
        """Re-place the experts now (`LLM.rebalance`): its report, or {"error": ...} where it cannot be."""
        try:
            return self.llm.rebalance()
        except RebalanceUnavailable as e:
            return {"error": Failure(status=400, message=str(e), code="rebalance_unavailable").model_dump()}

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
        return list(self.llm.backend.reports("where").values())

    def __del__(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is not None:
            llm.shutdown()
