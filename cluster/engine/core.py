"""The engine: requests in, tokens and text out, one `step` at a time.

It schedules and steps: it owns the scheduler (with its block tables) and builds each step's
messages; a `Backend` runs each step's batches (one per attention shard) and returns the sampled
tokens; its `OutputProcessor` holds the requests and their choices and turns the tokens into text
and reports (`cluster.engine.output_processor`), its `ExpertBalancer` keeps the experts' load and
re-places them (`cluster.engine.expert_balancer`). Requests are `cluster.engine.request`'s.
`LocalBackend` runs `model.Mixtral` in this process (the fast CPU path and the baseline);
`cluster.backend.ray_backend.RayBackend` runs the same step over Ray actors. The engine is synchronous and
single-threaded; `cluster.llm.LLM` drives it from a background thread for streaming.

`Engine.check_request` is the one place a request is checked: anything that can never run raises
`RequestError`, which names the OpenAI field (`param`) to blame; what passes is a `CheckedRequest`,
the only thing `add_request` takes.

A constrained request (`SamplingParams.structured`) comes with its compiled `Grammar`; each of
its choices keeps a matcher in the output processor, beside its tokens, and every draw carries the matcher's
allowed-token bitmask to the shard that samples it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch

from cluster.engine.expert_balancer import ExpertBalancer, Placer, RecordedStep
from cluster.engine.output_processor import OutputProcessor
from cluster.engine.request import CheckedRequest, RequestError, RequestOutput, SamplingParams, check_token_ids
from cluster.engine.scheduler import Chunk, Scheduler
from cluster.engine.sequence import Sequence as SchedSeq
from cluster.engine.structured import Grammar, bitmask
from model.config import ModelConfig
from model.decode_graphs import DecodeGraphs
from model.mixtral import Mixtral
from model.tokenizer import Tokenizer
from protocol.config import EngineSection, LLMConfig
from protocol.expert_cost import TOKENS
from protocol.experts import AnyPlacement
from protocol.step import Sampled, SeqChunk, ShardBatch, ShardRunner

logger = logging.getLogger(__name__)

EOS_WITHOUT_TOKENIZER = 2  # the end-of-sequence id of every Mistral vocabulary


class EngineError(RuntimeError):
    """The engine cannot serve any more (a worker died, the backend failed)."""


Report = Literal["where", "loaded", "settings", "step_times"]


class ShardsLost(Exception):
    """Attention shards died and were replaced: their KV caches (and their sequences' state) are gone."""

    def __init__(self, shards: list[int]) -> None:
        super().__init__(f"attention shards {shards} were replaced; their sequences must be recomputed")
        self.shards = shards


class RebalanceUnavailable(ValueError):
    """Re-placing experts needs expert groups: a single-process copy has one set of all of them."""


@dataclass
class Executed:
    """What one step on a backend gave."""

    sampled: list[list[Sampled]]  # per attention shard
    expert_counts: torch.Tensor  # [L, E] tokens routed to each expert
    group_tokens: torch.Tensor  # [L, G] (token, expert) pairs each expert group computed
    group_seconds: torch.Tensor  # [L, G] their seconds by the copy's cost model (`protocol.expert_cost`)


class Backend(Placer, Protocol):
    num_shards: int
    recoveries: list[dict[str, Any]]  # workers replaced after they died, and how long each took

    def execute(self, batches: list[ShardBatch]) -> Executed:
        """Run one step: per shard the sampled tokens, and where its tokens went."""
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
    num_groups = 1
    cost = TOKENS  # one group: nothing to split

    def __init__(self, model: Mixtral, num_blocks: int, settings: EngineSection, decode_graphs: bool = False) -> None:
        """`decode_graphs`: run decode steps through `DecodeGraphs` (up to the settings' context
        length and `max_seqs`), recorded as CUDA graphs on a GPU (the cache gets their scratch
        block on top)."""
        self.model = model
        self.recoveries: list[dict[str, Any]] = []  # no workers to lose
        weight = model.embed_tokens.weight
        graphs = (model, settings.context_length(model.config), settings.max_seqs) if decode_graphs else None
        self.shard = ShardRunner(model.config, num_blocks, settings.block_size, weight.dtype, weight.device, graphs)

    @property
    def graphs(self) -> DecodeGraphs | None:
        return self.shard.graphs

    @torch.inference_mode()
    def execute(self, batches: list[ShardBatch]) -> Executed:
        (batch,) = batches
        self.shard.begin(batch)
        cfg, device = self.model.config, self.shard.cache.k.device
        counts = torch.zeros(cfg.num_layers, cfg.num_experts, dtype=torch.long, device=device)  # [L, E]
        sampled: list[Sampled] = []
        replayed = self.shard.replay(batch)
        if replayed is not None:  # a decode step at a fixed shape, replayed
            logits, counts = replayed
            sampled = self.shard.draw(batch, logits, [(i, i + 1) for i in range(len(batch.chunks))])
        elif batch.chunks:
            p, cache = self.shard.pack(batch)
            logits = self.model(p.tokens, p.positions, p.seq_lens, cache, p.logit_rows, expert_counts=counts)
            sampled = self.shard.draw(batch, logits, p.spans)
        counts = counts.cpu()  # the counters are read once per step
        pairs = counts.sum(dim=1, keepdim=True)  # one group: all the pairs, nothing to balance
        return Executed([sampled], counts, pairs, torch.zeros(pairs.shape, dtype=torch.float64))

    def begin_rebalance(
        self,
        expert_counts: torch.Tensor,
        group_tokens: torch.Tensor,
        steps: list[RecordedStep],
        placement: AnyPlacement | None = None,
    ) -> dict[str, Any]:
        raise RebalanceUnavailable("re-placing experts needs expert groups; this copy runs in one process")

    def finish_rebalance(self) -> dict[str, Any] | None:
        return None

    def reports(self, report: Report) -> dict[str, Any]:
        return {}  # no workers: the engine's own step records are the profile

    def set_profiling(self, on: bool) -> None:
        pass

    def shutdown(self) -> None:
        pass


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
        self._drops: list[list[str]] = [[] for _ in range(backend.num_shards)]
        self._copies: list[list[tuple[tuple[int, int], str]]] = [[] for _ in range(backend.num_shards)]
        # Per shard, each sequence's block table as its shard has it: a chunk carries what changed;
        # and the sequences whose draw settings it keeps (`protocol.step.Sampler`): sent once.
        self._sent: list[dict[str, list[int]]] = [{} for _ in range(backend.num_shards)]
        self._primed: list[set[str]] = [set() for _ in range(backend.num_shards)]
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
        self._primed[child.shard].add(seq_id)  # its shard made its draw state when it drew its first token
        if copy is not None:  # its shard copies the partly filled last block before its next step
            self._copies[child.shard].append((copy, seq_id))
        return child

    def release_sequence(self, seq: SchedSeq) -> None:
        if seq.shard >= 0:
            self._drops[seq.shard].append(seq.request_id)
            self._sent[seq.shard].pop(seq.request_id, None)
            self._primed[seq.shard].discard(seq.request_id)
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

    # ---- one step ----------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Schedule, run one step on the backend, and report every choice that changed."""
        started = time.perf_counter()
        schedule = self.scheduler.schedule()
        if not schedule.chunks:
            return []
        self._numbered += 1  # the step's number: the backend may run it again, the shards draw once
        batches = [ShardBatch(finished=drops, step=self._numbered) for drops in self._drops]
        for batch, copies in zip(batches, self._copies, strict=True):  # for choices still alive
            batch.copies = [pair for pair, seq_id in copies if seq_id in self.outputs.choices]
        self._drops = [[] for _ in range(self.backend.num_shards)]
        self._copies = [[] for _ in range(self.backend.num_shards)]
        self._mask_seconds = 0.0
        for c in schedule.chunks:
            batches[c.seq.shard].chunks.append(self._chunk(c))
        executed = time.perf_counter()
        try:
            result = self.backend.execute(batches)
        except ShardsLost as lost:  # their workers were replaced: nothing of them survives but the requests
            for shard in lost.shards:
                self._drops[shard], self._copies[shard], self._sent[shard] = [], [], {}
                self.scheduler.reset_shard(shard)
            for primed in self._primed:  # the other shards drew tokens this step that nobody takes:
                primed.clear()  # their sequences' records (penalties' tokens) are sent again
            logger.warning("attention shards %s were replaced; their sequences are recomputed", lost.shards)
            return []  # this step's other work runs again in the next one (nothing was advanced)
        returned = time.perf_counter()
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

    def _chunk(self, c: Chunk) -> SeqChunk:
        req, choice = self.outputs.choices[c.seq.request_id]
        prompt_len = len(req.prompt)
        score = req.params.prompt_logprobs is not None and choice.index == 0 and c.start < prompt_len
        draw = c.sample and req.params.max_tokens > 0
        forks = req.pending if draw and choice.index == 0 and not choice.seq.output else []
        table, sent = c.seq.block_table, self._sent[c.seq.shard]
        known = _unchanged(sent.get(c.seq.request_id, []), table)  # entries the shard has already
        sent[c.seq.request_id] = list(table)
        chunk = SeqChunk(
            request_id=c.seq.request_id,
            tokens=c.seq.tokens[c.start : c.end],
            start=c.start,
            new_blocks=table[known:],
            blocks_from=known,
            sample=draw,
            logprobs=req.params.logprobs,
            prompt_logprobs=req.params.prompt_logprobs if score else None,
            next_token=req.prompt[c.end] if score and c.end < prompt_len else None,
            forks=list(forks),
        )
        if draw:  # the draw's controls; forks draw their first token in the same state as choice 0
            params, output = req.params, choice.seq.output
            if len(output) < params.min_tokens:  # the request's own banned ids travel with its settings
                chunk.banned = [*([] if params.ignore_eos else [self.eos_id]), *params.stop_token_ids]
            if choice.matcher is not None:
                began = time.perf_counter()
                chunk.allowed = bitmask(choice.matcher)
                self._mask_seconds += time.perf_counter() - began
            primed = self._primed[c.seq.shard]
            if c.seq.request_id not in primed:  # the shard keeps a sequence's draw settings from now on
                primed.add(c.seq.request_id)
                chunk.params = req.draw
                if req.draw.penalised:
                    chunk.output = list(output)
                    if req.draw.repetition_penalty != 1.0:
                        chunk.prompt_seen = sorted(set(req.prompt))
        return chunk

    def fail_all(self, error: str) -> list[RequestOutput]:
        """End every request with `error` (the backend is gone)."""
        return self.outputs.fail_all(error)

    def shutdown(self) -> None:
        self.backend.shutdown()


def _unchanged(sent: list[int], table: list[int]) -> int:
    """How many leading entries of `table` the shard already has (`sent`): all of them while the
    table only grows, fewer where a window freed blocks or a preemption started it again."""
    n = len(sent)
    if len(table) >= n and table[:n] == sent:
        return n
    i, m = 0, min(n, len(table))
    while i < m and sent[i] == table[i]:
        i += 1
    return i
