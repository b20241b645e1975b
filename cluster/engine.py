"""The engine: requests in, tokens and text out, one `step` at a time.

It owns the scheduler, the block tables and the tokenizer; a `Backend` runs each step's batches
(one per attention shard) and returns the sampled tokens. `LocalBackend` runs `model.Mixtral`
in this process (the fast CPU path and the baseline); `cluster.workers.RayBackend` runs the same
step over Ray actors. The engine is synchronous and single-threaded; `cluster.llm.LLM` drives it
from a background thread for streaming.

`Engine.add_request` is the one place a request is checked: anything that can never run raises
`RequestError`, which names the OpenAI field (`param`) to blame.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch
from pydantic import Field

from cluster.scheduler import Chunk, Scheduler
from cluster.scheduler import Sequence as SchedSeq
from model.config import ModelConfig
from model.kv_cache import CacheBatch, KVCache
from model.mixtral import Mixtral
from model.sampling import SamplingParams as ModelSamplingParams
from model.tokenizer import IncrementalDecoder, Tokenizer
from protocol.config import EngineSection
from protocol.step import Sampled, Sampler, SeqChunk, ShardBatch, pack

logger = logging.getLogger(__name__)

EOS_WITHOUT_TOKENIZER = 2  # the end-of-sequence id of every Mistral vocabulary

FinishReason = Literal["stop", "length", "abort"]


class SamplingParams(ModelSamplingParams):
    """Per-request generation settings (the model-level ones plus stopping rules)."""

    stop: list[str] = Field(default_factory=list)  # stop strings; the text ends before the first match
    stop_token_ids: list[int] = Field(default_factory=list)
    ignore_eos: bool = False
    logprobs: bool = False  # log-probability of each sampled token


class EngineError(RuntimeError):
    """The engine cannot serve any more (a worker died, the backend failed)."""


class RequestFailed(RuntimeError):
    """One request failed while it ran (its sampling, its detokenising); the engine goes on."""


class RequestError(ValueError):
    """A request that can never run. `param` is the OpenAI request field that makes it so
    (`prompt`, `max_tokens`, ...), `code` the OpenAI error code."""

    def __init__(self, message: str, param: str | None = None, code: str = "invalid_value") -> None:
        super().__init__(message)
        self.message, self.param, self.code = message, param, code

    def __reduce__(self) -> tuple[type[RequestError], tuple[str, str | None, str]]:
        return RequestError, (self.message, self.param, self.code)  # picklable across Ray


@dataclass
class RequestOutput:
    """A request's state after a step: what is new since the last update and everything so far."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    new_token_ids: list[int]
    new_text: str
    finished: bool = False
    finish_reason: FinishReason | None = None
    logprobs: list[float] | None = None
    error: str | None = None  # the request ended in error: its own (a RequestFailed) or the engine's
    engine_failed: bool = False  # the error is the engine's: it cannot serve any more


Report = Literal["where", "loaded", "settings", "step_times"]


class Backend(Protocol):
    num_shards: int

    def execute(self, batches: list[ShardBatch]) -> tuple[list[list[Sampled]], torch.Tensor]:
        """Run one step; per shard the sampled tokens, and the step's tokens per expert [L, E]."""
        ...

    def reports(self, report: Report) -> dict[str, Any]:
        """Each worker's report, by worker name: where it runs, what it loaded, the settings it runs
        with, its step times since the last call (`LLM.profile`). Empty without workers."""
        ...

    def set_profiling(self, on: bool) -> None:
        """Start (or stop) the workers recording seconds per phase of each step."""
        ...

    def shutdown(self) -> None: ...


class LocalBackend:
    """The whole model in this process: one shard, one cache, no workers."""

    num_shards = 1

    def __init__(self, model: Mixtral, num_blocks: int, block_size: int) -> None:
        self.model = model
        weight = model.embed_tokens.weight
        self.cache = KVCache.allocate(model.config, num_blocks, block_size, weight.dtype, weight.device)
        self.sampler = Sampler()

    @torch.inference_mode()
    def execute(self, batches: list[ShardBatch]) -> tuple[list[list[Sampled]], torch.Tensor]:
        (batch,) = batches
        self.sampler.drop(batch.finished)
        cfg, device = self.model.config, self.cache.k.device
        counts = torch.zeros(cfg.num_layers, cfg.num_experts, dtype=torch.long, device=device)  # [L, E]
        if not batch.chunks:
            return [[]], counts.cpu()
        p = pack(batch, device)
        cache = CacheBatch(self.cache, p.block_tables)
        logits = self.model(p.tokens, p.positions, p.seq_lens, cache, logit_rows=p.logit_rows, expert_counts=counts)
        return [self.sampler.sample(batch, logits)], counts.cpu()  # the counters are read once per step

    def reports(self, report: Report) -> dict[str, Any]:
        return {}  # no workers: the engine's own step records are the profile

    def set_profiling(self, on: bool) -> None:
        pass

    def shutdown(self) -> None:
        pass


@dataclass
class _Request:
    seq: SchedSeq
    params: SamplingParams
    decoder: IncrementalDecoder | None  # None: the model has no tokenizer, its text stays empty
    text: str = ""
    emitted: int = 0  # characters of text already reported
    emitted_tokens: int = 0
    logprobs: list[float] = field(default_factory=list)

    def push(self, token: int) -> str:
        return self.decoder.push(token) if self.decoder is not None else ""

    def flush(self) -> str:
        return self.decoder.flush() if self.decoder is not None else ""


class Engine:
    def __init__(
        self,
        backend: Backend,
        config: ModelConfig,
        tokenizer: Tokenizer | None,
        settings: EngineSection,
        blocks_per_shard: int,
    ) -> None:
        self.backend = backend
        self.config = config
        self.tokenizer = tokenizer
        self.eos_id = tokenizer.eos_id if tokenizer is not None else EOS_WITHOUT_TOKENIZER
        self.max_model_len = settings.max_model_len or config.max_position_embeddings
        self.scheduler = Scheduler(
            backend.num_shards,
            blocks_per_shard,
            settings.block_size,
            settings.max_batched_tokens,
            settings.max_seqs,
            config.sliding_window,
        )
        self.requests: dict[str, _Request] = {}
        self.expert_counts = torch.zeros(config.num_layers, config.num_experts, dtype=torch.long)
        self._drops: list[list[str]] = [[] for _ in range(backend.num_shards)]
        self.steps = 0
        self.profile = False  # when set, `step_records` gets one entry per step
        self.step_records: list[dict[str, float]] = []

    # ---- requests ----------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt: Sequence[int], params: SamplingParams) -> None:
        """Queue a request; `RequestError` for one that can never run (empty, too long, bad token ids,
        more KV blocks than a shard has)."""
        if request_id in self.requests:
            raise RequestError(f"request id {request_id!r} is already in use", code="duplicate_request_id")
        self.check_request(prompt, params, request_id)
        seq = self.scheduler.add(request_id, list(prompt), params.max_tokens)
        decoder = self.tokenizer.decoder() if self.tokenizer is not None else None
        self.requests[request_id] = _Request(seq, params, decoder)

    def check_request(self, prompt: Sequence[int], params: SamplingParams, request_id: str = "") -> None:
        """`RequestError` for a prompt and settings this engine can never run; reads fixed limits only."""
        if not prompt:
            raise RequestError("prompt is empty", "prompt")
        if params.stop and self.tokenizer is None:
            raise RequestError("stop strings need a tokenizer, and this model has none; use stop_token_ids", "stop")
        vocab = self.config.vocab_size
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise RequestError(f"prompt token ids {bad[:5]} are outside the vocabulary (0..{vocab - 1})", "prompt")
        limit = self.max_model_len
        if len(prompt) >= limit:
            raise RequestError(
                f"the prompt is {len(prompt)} tokens; this model's context is {limit}",
                "prompt",
                "context_length_exceeded",
            )
        if len(prompt) + params.max_tokens > limit:
            raise RequestError(
                f"max_tokens ({params.max_tokens}) + the prompt ({len(prompt)} tokens) exceeds the context length "
                f"{limit}; ask for at most {limit - len(prompt)}",
                "max_tokens",
                "context_length_exceeded",
            )
        try:
            self.scheduler.check_fits(request_id or "this request", len(prompt) + params.max_tokens)
        except ValueError as e:  # more KV blocks than a shard holds
            raise RequestError(str(e), "max_tokens") from e

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request now: its blocks are free for the next step."""
        req = self.requests.get(request_id)
        if req is None:
            return None
        return self._finish(req, "abort")

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    def num_running(self) -> int:
        return len(self.scheduler.running)

    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    def blocks_in_use(self) -> int:
        return self.scheduler.blocks_in_use()

    @property
    def kv_capacity_tokens(self) -> int:
        """Tokens the KV cache of all shards holds at once."""
        return sum(a.num_blocks for a in self.scheduler.allocators) * self.scheduler.block_size

    # ---- one step ----------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Schedule, run one step on the backend, and report every request that changed."""
        started = time.perf_counter()
        schedule = self.scheduler.schedule()
        if not schedule.chunks:
            return []
        batches = [ShardBatch(finished=drops) for drops in self._drops]
        self._drops = [[] for _ in range(self.backend.num_shards)]
        for c in schedule.chunks:
            batches[c.seq.shard].chunks.append(self._chunk(c))
        executed = time.perf_counter()
        sampled, counts = self.backend.execute(batches)
        returned = time.perf_counter()
        self.expert_counts += counts
        self.scheduler.advance(schedule.chunks)
        self.steps += 1
        outputs = []
        for shard_out in sampled:
            for s in shard_out:
                req = self.requests.get(s.request_id)
                if req is not None:
                    outputs.append(self._apply(req, s))
        if self.profile:
            self.step_records.append({
                "wall": time.perf_counter() - started,  # the whole step, scheduling and detokenising included
                "execute": returned - executed,  # the backend's part
                "tokens": sum(c.end - c.start for c in schedule.chunks),
                "seqs": len(schedule.chunks),
                "decode": all(c.end - c.start == 1 for c in schedule.chunks),
            })  # fmt: skip
        return outputs

    def _chunk(self, c: Chunk) -> SeqChunk:
        req = self.requests[c.seq.request_id]
        return SeqChunk(
            request_id=c.seq.request_id,
            tokens=c.seq.tokens[c.start : c.end],
            start=c.start,
            block_table=list(c.seq.block_table),
            params=req.params if c.sample else None,
            logprobs=req.params.logprobs,
        )

    def _apply(self, req: _Request, s: Sampled) -> RequestOutput:
        """A sampled token into its request; a failure of this one request ends it alone."""
        if s.error is not None:
            return self._fail(req, s.error)
        try:
            return self._append(req, s)
        except Exception as e:  # detokenising or stop checks of this request
            logger.exception("request %s failed after a step", req.seq.request_id)
            return self._fail(req, f"{type(e).__name__}: {e}")

    def _fail(self, req: _Request, error: str) -> RequestOutput:
        logger.warning("request %s failed: %s", req.seq.request_id, error)
        out = self._finish(req, "abort")
        out.error = f"request {req.seq.request_id} failed: {error}"
        return out

    def _append(self, req: _Request, s: Sampled) -> RequestOutput:
        seq, params = req.seq, req.params
        seq.output.append(s.token)
        if s.logprob is not None:
            req.logprobs.append(s.logprob)
        stop_token = s.token in params.stop_token_ids or (s.token == self.eos_id and not params.ignore_eos)
        reason: FinishReason | None = None
        if stop_token:
            req.text += req.flush()
            reason = "stop"
        else:
            req.text += req.push(s.token)
            cut = _first_stop(req.text, params.stop, max(0, req.emitted - _longest(params.stop)))
            if cut is not None:
                req.text = req.text[:cut]
                reason = "stop"
            elif len(seq.output) >= params.max_tokens or len(seq.tokens) >= self.max_model_len:
                req.text += req.flush()
                reason = "length"
        if reason is not None:
            return self._finish(req, reason)
        return self._update(req, hold=_longest(params.stop) - 1)

    def _update(self, req: _Request, hold: int = 0, reason: FinishReason | None = None) -> RequestOutput:
        """The delta since the last report; `hold` characters stay back while a stop string may be forming."""
        visible = len(req.text) if reason is not None else max(req.emitted, len(req.text) - max(hold, 0))
        new_text = req.text[req.emitted : visible]
        req.emitted = visible
        new_tokens = req.seq.output[req.emitted_tokens :]
        req.emitted_tokens = len(req.seq.output)
        return RequestOutput(
            request_id=req.seq.request_id,
            prompt_token_ids=req.seq.prompt,
            token_ids=list(req.seq.output),
            text=req.text[:visible],
            new_token_ids=new_tokens,
            new_text=new_text,
            finished=reason is not None,
            finish_reason=reason,
            logprobs=list(req.logprobs) if req.params.logprobs else None,
        )

    def _finish(self, req: _Request, reason: FinishReason) -> RequestOutput:
        seq = req.seq
        if seq.shard >= 0:
            self._drops[seq.shard].append(seq.request_id)
        self.scheduler.finish(seq)
        del self.requests[seq.request_id]
        return self._update(req, reason=reason)

    def fail_all(self, error: str) -> list[RequestOutput]:
        """End every request with `error` (the backend is gone)."""
        outs = []
        for req in list(self.requests.values()):
            out = self._finish(req, "abort")
            out.error, out.engine_failed = error, True
            outs.append(out)
        return outs

    def shutdown(self) -> None:
        self.backend.shutdown()


def _longest(stops: Sequence[str]) -> int:
    return max((len(s) for s in stops), default=0)


def _first_stop(text: str, stops: Sequence[str], start: int) -> int | None:
    """Index where the earliest stop string begins in text[start:], if any."""
    hits = [i for s in stops if s and (i := text.find(s, start)) >= 0]
    return min(hits) if hits else None
