"""The engine: requests in, tokens and text out, one `step` at a time.

A step is three calls: schedule (the scheduler, with its block tables), the shards' batches
(`ShardView`: each shard's chunks with what changed since it last saw them), execute (a `Backend`,
known only by its protocol: `cluster.engine.backend`), then advance and process (the scheduler
moves on, the `OutputProcessor` turns the tokens into text and reports, the `ExpertBalancer`
records the experts' load and tends to a re-placement). Requests are `cluster.engine.request`'s.
The engine is synchronous and single-threaded; `cluster.llm.LLM` drives it from a background
thread for streaming.

`Engine.check_request` is the one place a request is checked: anything that can never run raises
`RequestError`, which names the OpenAI field (`param`) to blame; what passes is a `CheckedRequest`,
the only thing `add_request` takes.

A constrained request (`SamplingParams.structured`) comes with its compiled `Grammar`; each of
its choices keeps a matcher in the output processor, beside its tokens, and every draw carries the matcher's
allowed-token bitmask to the shard that samples it.
"""

from __future__ import annotations

import concurrent.futures
import logging
import time
from collections.abc import Sequence
from typing import Any

import torch

from cluster.engine.backend import Backend, Executed, ShardsLost
from cluster.engine.expert_balancer import ExpertBalancer
from cluster.engine.output_processor import OutputProcessor
from cluster.engine.request import CheckedRequest, RequestError, RequestOutput, SamplingParams, check_token_ids
from cluster.engine.scheduler import Chunk, Schedule, Scheduler
from cluster.engine.sequence import Sequence as SchedSeq
from cluster.engine.shard_view import DrawRecord, ShardView, Work
from cluster.engine.structured import Grammar, bitmask
from model.config import ModelConfig
from model.tokenizer import Tokenizer
from protocol.config import LLMConfig
from protocol.experts import AnyPlacement
from protocol.step import SeqChunk, ShardBatch

logger = logging.getLogger(__name__)

EOS_WITHOUT_TOKENIZER = 2  # the end-of-sequence id of every Mistral vocabulary


class Engine:
    def __init__(
        self,
        backend: Backend,
        config: ModelConfig,
        tokenizer: Tokenizer | None,
        llm_config: LLMConfig,
        blocks_per_shard: int,
    ) -> None:
        """`config`: the model's shape; `llm_config`: the copy's config, read whole here (its
        `engine` section, and `cluster.rebalance_interval_s`)."""
        settings = llm_config.engine
        self.backend = backend
        self.config = config
        self.tokenizer = tokenizer
        self.settings = settings
        self.eos_id = tokenizer.eos_id if tokenizer is not None else EOS_WITHOUT_TOKENIZER
        self.max_model_len = settings.context_length(config)
        self.outputs = OutputProcessor(tokenizer, self.eos_id, self.max_model_len, self)
        self.scheduler = Scheduler.of(settings, backend.num_shards, blocks_per_shard, config.sliding_window)
        interval = llm_config.cluster.rebalance_interval_s
        self.experts = ExpertBalancer(backend, config.num_layers, config.num_experts, interval)
        self.shards = ShardView(backend.num_shards)
        self.steps = 0
        self._numbered = 0  # steps handed to the backend, thrown-away ones included (ShardBatch.step)
        self.profile = False  # when set, `step_records` gets one entry per step
        self.step_records: list[dict[str, float]] = []
        self._mask_seconds = 0.0  # computing this step's grammar masks (part of its planning)

    # ---- requests ----------------------------------------------------------------------------

    def add_request(self, request_id: str, request: CheckedRequest, grammar: Grammar | None = None) -> None:
        """Queue a checked request (`check_request`); `RequestError` for an id in use. A request with
        `params.structured` comes with its compiled `grammar` (`cluster.engine.structured.Grammars.compile`,
        off this thread)."""
        params = request.params
        if self.outputs.in_use(request_id, params.n):
            raise RequestError(f"request id {request_id!r} is already in use", code="duplicate_request_id")
        if (grammar.spec if grammar is not None else None) != params.structured:
            param = params.structured.param if params.structured is not None else None
            raise RequestError("params.structured needs its compiled grammar (Grammars.compile), and only it", param)
        reuse = params.prompt_logprobs is None  # every prompt position must be computed to be scored
        seq = self.scheduler.add(request_id, request.prompt, params.max_tokens, reuse=reuse)
        self.outputs.add(request_id, request, seq, grammar)

    def check_request(self, prompt: Sequence[int], params: SamplingParams) -> CheckedRequest:
        """The request, checked: `RequestError` for a prompt and settings this engine can never run.
        Reads fixed limits only, so any thread may call it."""
        if not prompt:
            raise RequestError("prompt is empty", "prompt")
        if params.stop and self.tokenizer is None:
            raise RequestError("stop strings need a tokenizer, and this model has none; use stop_token_ids", "stop")
        if params.n > self.settings.max_n:
            raise RequestError(f"n is {params.n}; this server allows at most {self.settings.max_n}", "n")
        if params.max_tokens == 0 and (params.prompt_logprobs is None or params.n > 1):
            raise RequestError("max_tokens must be > 0, except to score a prompt (echo with logprobs, n 1)",
                               "max_tokens")  # fmt: skip
        checked = {"prompt": prompt, "logit_bias": params.logit_bias, "bad_token_ids": params.bad_token_ids,
                   "stop_token_ids": params.stop_token_ids}  # fmt: skip
        for param, ids in checked.items():
            check_token_ids(ids, self.config.vocab_size, param)
        if params.min_tokens > params.max_tokens:
            raise RequestError(f"min_tokens ({params.min_tokens}) exceeds max_tokens ({params.max_tokens})",
                               "min_tokens")  # fmt: skip
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
            self.scheduler.check_fits("this request", len(prompt) + params.max_tokens)
        except ValueError as e:  # more KV blocks than a shard holds
            raise RequestError(str(e), "max_tokens") from e
        return CheckedRequest(list(prompt), params)

    def abort(self, request_id: str) -> list[RequestOutput]:
        """Stop a request, every choice of it, now: its blocks are free for the next step."""
        return self.outputs.abort(request_id)

    # ---- a choice's sequence, for the output processor (`Sequences`) --------------------------

    def fork_sequence(self, seq: SchedSeq, seq_id: str) -> SchedSeq:
        child, copy = self.scheduler.fork(seq, seq_id)
        self.shards.fork(child, copy)
        return child

    def release_sequence(self, seq: SchedSeq) -> None:
        self.shards.release(seq)
        self.scheduler.finish(seq)

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
        return sum(p.num_blocks for p in self.scheduler.blocks.pools) * self.scheduler.block_size

    # ---- the experts, between steps --------------------------------------------------------------

    def expert_counts(self) -> torch.Tensor:
        """Tokens routed to each expert since the start, per layer: [L, E]."""
        return self.experts.expert_counts.clone()

    def expert_load(self) -> dict[str, Any]:
        """Since the experts were last placed: pairs per group and their imbalance, per phase the
        modelled expert ms per step and cost imbalance (`ExpertBalancer.load`)."""
        return self.experts.load()

    def rebalance(self, done: concurrent.futures.Future[dict[str, Any]], placement: AnyPlacement | None) -> None:
        """Place the experts anew (`ExpertBalancer.begin`); `done` gets the report once they switched."""
        self.experts.begin(done, placement)

    def abandon_rebalance(self, error: Exception) -> None:
        """The engine stops: whoever waits for a re-placement's report gets `error` instead."""
        self.experts.abandon(error)

    @property
    def needs_upkeep(self) -> bool:
        """Whether `step` has work between steps even while no request is in (a re-placement under
        way or due)."""
        return self.experts.needs_maintenance

    # ---- one step ----------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Schedule, build the shards' batches, execute them on the backend, advance and report every
        choice that changed; then tend to the experts' placement (also when nothing was scheduled)."""
        started = time.perf_counter()
        schedule = self.scheduler.schedule()
        outputs: list[RequestOutput] = []
        if schedule.chunks:
            self._numbered += 1  # the step's number: the backend may run it again, the shards draw once
            self._mask_seconds = 0.0
            work = [self._work(c) for c in schedule.chunks]
            batches = self.shards.batches(self._numbered, work, self.outputs.choices.__contains__)
            executed = time.perf_counter()
            result = self._execute(batches)
            if result is not None:
                outputs = self._advance(schedule, batches, result, (started, executed, time.perf_counter()))
        self.experts.maintain()  # between steps: the place to switch expert placements
        return outputs

    def _execute(self, batches: list[ShardBatch]) -> Executed | None:
        """The backend's step; None where attention shards were lost (nothing was advanced: the step's
        other work runs again in the next one, theirs is recomputed)."""
        try:
            return self.backend.execute(batches)
        except ShardsLost as lost:  # their workers were replaced: nothing of them survives but the requests
            self.shards.lost(lost.shards)
            for shard in lost.shards:
                self.scheduler.reset_shard(shard)
            logger.warning("attention shards %s were replaced; their sequences are recomputed", lost.shards)
            return None

    def _advance(
        self, schedule: Schedule, batches: list[ShardBatch], result: Executed, clock: tuple[float, float, float]
    ) -> list[RequestOutput]:
        """Record the experts' load, move the scheduler on, turn the tokens into reports."""
        started, executed, returned = clock
        phase = "prefill" if any(len(c.tokens) > 1 for b in batches for c in b.chunks) else "decode"
        self.experts.record(phase, result.expert_counts, result.group_tokens, result.group_seconds)
        self.scheduler.advance(schedule.chunks)
        self.steps += 1
        results = {s.request_id: s for shard_out in result.sampled for s in shard_out}
        outputs = self.outputs.process([(c.seq, c.start, c.end) for c in schedule.chunks], results)
        if self.profile:
            self.step_records.append({
                "wall": time.perf_counter() - started,  # the whole step, scheduling and detokenising included
                "execute": returned - executed,  # the backend's part
                "masks": self._mask_seconds,  # the grammars' allowed-token masks, on this thread
                "tokens": sum(c.end - c.start for c in schedule.chunks),
                "seqs": len(schedule.chunks),
                "decode": all(c.end - c.start == 1 for c in schedule.chunks),
            })  # fmt: skip
        return outputs

    def _work(self, c: Chunk) -> Work:
        """A scheduled chunk as its request asks: the tokens, what to report, this step's draw controls
        and, where it draws, its settings (sent where its shard lacks them: `ShardView`)."""
        req, choice = self.outputs.choices[c.seq.request_id]
        prompt_len = len(req.prompt)
        score = req.params.prompt_logprobs is not None and choice.index == 0 and c.start < prompt_len
        draw = c.sample and req.params.max_tokens > 0
        forks = req.pending if draw and choice.index == 0 and not choice.seq.output else []
        chunk = SeqChunk(
            request_id=c.seq.request_id,
            tokens=c.seq.tokens[c.start : c.end],
            start=c.start,
            new_blocks=[],  # the shard's delta, filled by ShardView
            sample=draw,
            logprobs=req.params.logprobs,
            prompt_logprobs=req.params.prompt_logprobs if score else None,
            next_token=req.prompt[c.end] if score and c.end < prompt_len else None,
            forks=list(forks),
        )
        if not draw:
            return Work(c.seq, chunk, None)
        # the draw's controls; forks draw their first token in the same state as choice 0
        params, output = req.params, choice.seq.output
        if len(output) < params.min_tokens:  # the request's own banned ids travel with its settings
            chunk.banned = [*([] if params.ignore_eos else [self.eos_id]), *params.stop_token_ids]
        if choice.matcher is not None:
            began = time.perf_counter()
            chunk.allowed = bitmask(choice.matcher)
            self._mask_seconds += time.perf_counter() - began

        def record() -> DrawRecord:
            if not req.draw.penalised:
                return req.draw, None, None
            seen = sorted(set(req.prompt)) if req.draw.repetition_penalty != 1.0 else None
            return req.draw, list(output), seen

        return Work(c.seq, chunk, record)

    def fail_all(self, error: str) -> list[RequestOutput]:
        """End every request with `error` (the backend is gone)."""
        return self.outputs.fail_all(error)

    def shutdown(self) -> None:
        self.backend.shutdown()
