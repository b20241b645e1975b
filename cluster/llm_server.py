"""`LLMServer`: the Serve deployment whose replica is one model copy.

Its workers run in the replica's placement group (bundle 0 is the replica itself, then one per
worker; `ServeConfig.replica_bundles`), so Serve's autoscaling adds whole copies. It owns the
`LLM` (engine, tokenizer, workers), admits requests against the copy's KV budget, and answers
the ingress with the typed messages of `cluster/serve_messages.py`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import ray
from ray import serve

from actors.worker import rss_bytes
from cluster.engine import EngineError, RequestError, RequestFailed
from cluster.llm import LLM
from cluster.openai_protocol import APIError
from cluster.serve_config import ServeConfig
from cluster.serve_messages import Failure, GenerateCall, Head, Update


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
        """First a `Head` (or a `Failure`), then an `Update` per engine step (or a `Failure`)."""
        need = 0
        try:
            if call.messages is not None:
                prompt = self.llm.encode_chat([m.model_dump() for m in call.messages])
            else:
                assert call.prompt is not None  # GenerateCall holds one or the other
                prompt = self.llm.encode(call.prompt)
            self.llm.check_request(prompt, call.params)
            need = len(prompt) + call.params.max_tokens
            if self.demand + need > self.token_budget and self.demand > 0:
                need = 0
                raise APIError(429, "this model copy is at capacity (KV cache and queue); retry shortly",
                               code="overloaded")  # fmt: skip
            self.demand += need
            updates = await self.llm.open_stream(prompt, call.params, request_id=call.id)
            try:
                yield Head(prompt_tokens=len(prompt), replica=self.replica)
                async for out in updates:
                    new = out.logprobs[-len(out.new_token_ids) :] if out.logprobs and out.new_token_ids else []
                    logprobs = [e.logprob for e in new]
                    yield Update(text=out.new_text, token_ids=out.new_token_ids, finish_reason=out.finish_reason,
                                 logprobs=logprobs)  # fmt: skip
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
        return list(self.llm.backend.reports("where").values())

    def __del__(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is not None:
            llm.shutdown()
