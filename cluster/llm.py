"""`LLM`: the public offline and streaming API, in the spirit of vLLM's.

    llm = LLM("ckpt/", attention_shards=2, routers=1, expert_groups=4)     # keys of protocol.config
    llm = LLM(ServeConfig.load("configs/tiny.yaml"))                       # or a config whole
    outs = llm.generate(prompts, SamplingParams(max_tokens=16, temperature=0.0))
    async for out in llm.stream(prompt, params): ...     # new tokens/text per step, cancellable
    llm.shutdown()

The engine runs in one background thread (`EngineLoop`) that owns it: every request, abort and
step happens there, so callers on any thread or event loop never race the scheduler. In one
process the model is also loaded there, so one thread does all of its tensor work.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import queue
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from cluster.backend import open_backend
from cluster.backend.placement import Layout
from cluster.engine.backend import Backend, EngineError
from cluster.engine.block_pool import blocks_for_budget
from cluster.engine.core import Engine
from cluster.engine.request import CheckedRequest, RequestError, RequestFailed, RequestOutput, SamplingParams
from cluster.engine.structured import Grammar, GrammarError, Grammars
from model.config import ModelConfig
from model.tokenizer import ChatFormatError, Tokenizer
from protocol.config import LLMConfig
from protocol.experts import AnyPlacement

logger = logging.getLogger(__name__)

Prompt = str | Sequence[int]
MAINTENANCE_S = 0.05  # how often an idle engine loop tends to a re-placement under way
OnOutput = Callable[[RequestOutput], None]
Submission = tuple[str, CheckedRequest, OnOutput, Grammar | None]  # id, request, callback, grammar


class EngineLoop:
    """Drives an `Engine` from one thread; other threads talk to it through a command queue."""

    def __init__(self, make_engine: Callable[[], Engine]) -> None:
        """`make_engine` runs on the loop thread, so the tensors it allocates and the model it
        loads are first touched there; its exception, if any, is raised here."""
        self.error: str | None = None
        self._commands: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._subscribers: dict[str, OnOutput] = {}
        self._lock = threading.Lock()
        self._closed = False
        made: concurrent.futures.Future[Engine] = concurrent.futures.Future()
        args = (make_engine, made, torch.get_num_threads())  # the caller's thread count, not OpenMP's default
        self._thread = threading.Thread(target=self._run, args=args, name="engine-loop", daemon=True)
        self._thread.start()
        self.engine = made.result()

    def submit(
        self, request_id: str, request: CheckedRequest, on_output: OnOutput, grammar: Grammar | None = None
    ) -> concurrent.futures.Future[None]:
        """Queue a request; the future fails with RequestError (an id in use) or EngineError (engine down)."""
        return self.submit_all([(request_id, request, on_output, grammar)])[0]

    def submit_all(self, requests: Sequence[Submission]) -> list[concurrent.futures.Future[None]]:
        """Queue requests as one command, so the first step already schedules all of them."""
        futures: list[concurrent.futures.Future[None]] = [concurrent.futures.Future() for _ in requests]

        def add_all() -> None:
            for (request_id, request, on_output, grammar), fut in zip(requests, futures, strict=True):
                if self.error is not None:
                    fut.set_exception(EngineError(self.error))
                    continue
                try:
                    self.engine.add_request(request_id, request, grammar)
                except Exception as e:  # RequestError, or a bug: the caller hears of it rather than waits
                    fut.set_exception(e)
                    continue
                self._subscribers[request_id] = on_output
                fut.set_result(None)

        self._call(add_all, futures)
        return futures

    def abort(self, request_id: str) -> None:
        def do() -> None:
            self._subscribers.pop(request_id, None)
            self.engine.abort(request_id)

        self._call(do)

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the loop thread between steps and return its result."""
        fut: concurrent.futures.Future[Any] = concurrent.futures.Future()

        def run() -> None:
            try:
                fut.set_result(fn())
            except Exception as e:  # the caller gets it; the loop goes on
                fut.set_exception(e)

        self._call(run, [fut])
        return fut.result()

    def _call(self, fn: Callable[[], None], futures: Sequence[concurrent.futures.Future[Any]] = ()) -> None:
        with self._lock:
            if not self._closed:
                self._commands.put(fn)
                return
        for fut in futures:
            fut.set_exception(EngineError(self.error or "the engine is shut down"))

    def stop(self) -> None:
        self._commands.put(None)
        self._thread.join(timeout=30)

    def _run(self, make_engine: Callable[[], Engine], made: concurrent.futures.Future[Engine], threads: int) -> None:
        try:
            torch.set_num_threads(threads)
            self.engine = make_engine()
        except BaseException as e:
            with self._lock:
                self._closed = True
            made.set_exception(e)
            return
        made.set_result(self.engine)
        try:
            while True:
                try:
                    # Wait for commands only when idle; with work queued, take what is there and step.
                    # Idle with a re-placement under way (or due), wake now and then to tend to it.
                    if self.engine.has_work:
                        cmd = self._commands.get(block=False)
                    else:
                        wait = MAINTENANCE_S if self.engine.needs_upkeep else None
                        cmd = self._commands.get(timeout=wait)
                except queue.Empty:
                    cmd = _STEP
                if cmd is None:
                    return
                if cmd is not _STEP:
                    cmd()
                    continue  # drain every queued command before the next step
                try:
                    outputs = self.engine.step()  # with no request in, only its upkeep between steps
                except Exception as e:
                    logger.exception("engine step failed")
                    self.error = f"the engine failed and cannot serve any more: {e}"
                    self._deliver(self.engine.fail_all(self.error))
                    return
                self._deliver(outputs)
        finally:
            with self._lock:
                self._closed = True
            self.engine.abandon_rebalance(EngineError(self.error or "the engine is shut down"))
            while not self._commands.empty():  # answer what was queued: add() refuses once error is set
                cmd = self._commands.get_nowait()
                if cmd is not None and cmd is not _STEP:
                    self.error = self.error or "the engine is shut down"
                    cmd()

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            sub = self._subscribers.get(out.request_id)
            if out.request_finished:
                self._subscribers.pop(out.request_id, None)
            if sub is None:
                continue
            try:
                sub(out)
            except Exception:  # a caller that went away (its event loop closed): drop it, not the engine
                logger.warning("dropping request %s: its caller no longer takes updates", out.request_id)
                self._subscribers.pop(out.request_id, None)
                self.engine.abort(out.request_id)


def _step() -> None:
    """Sentinel command: run one engine step."""


_STEP = _step


class LLM:
    """One model copy: in this process (`single_process=True`) or spread over Ray actors."""

    def __init__(
        self,
        config: LLMConfig | str | Path | None = None,
        *,
        ray_address: str | None = None,
        placement: Any = None,
        bundle_offset: int = 0,
        **keywords: Any,
    ) -> None:
        """`config` whole (a `ServeConfig` too), or a checkpoint directory with the config's keys as
        keywords (`protocol.config`: `attention_shards`, `dtype`, `num_blocks`, `kernels`, ...).
        `ray_address`, `placement` and `bundle_offset` say where the workers start, not what they are:
        a Ray cluster to join, or a Serve replica's placement group whose first bundles are not theirs.
        The checkpoint may come as a keyword too: `LLM(checkpoint=path, ...)`."""
        if config is None:
            if "checkpoint" not in keywords:
                raise TypeError("LLM needs a config or a checkpoint: LLM(path) or LLM(checkpoint=path)")
            config = LLMConfig.from_keywords(**keywords)
        elif isinstance(config, LLMConfig):
            config = config.with_overrides(**keywords) if keywords else config
        else:
            config = LLMConfig.from_keywords(checkpoint=config, **keywords)
        self.config = config
        self.checkpoint = config.ensure_checkpoint()
        self.dtype = config.dtype
        self.model_config = ModelConfig.from_checkpoint(self.checkpoint)
        self.tokenizer = Tokenizer.for_checkpoint(self.checkpoint, self.model_config.vocab_size)
        if self.tokenizer is not None and self.tokenizer.vocab_size > self.model_config.vocab_size:
            pieces, vocab = self.tokenizer.vocab_size, self.model_config.vocab_size
            raise ValueError(f"the tokenizer has {pieces} pieces but the model only {vocab}")
        eng = config.engine
        blocks = eng.num_blocks or blocks_for_budget(
            self.model_config, eng.block_size, self.dtype, int(eng.kv_cache_gb * (1 << 30))
        )
        self.layout = Layout.of(config.cluster)
        make_backend = open_backend(config, self.model_config, self.checkpoint, blocks, ray_address, placement,
                                    bundle_offset)  # fmt: skip

        def make_engine() -> Engine:
            # Built on the engine loop's thread, which then does all of the copy's tensor work in this
            # process: with two threads each owning an OpenMP pool on a machine with no spare cores,
            # libgomp stops its workers spinning between parallel regions and every op waits on a
            # futex wake (the mini workload 7.2 s instead of 4.9 s, measured).
            backend = make_backend()
            try:
                return Engine(backend, self.model_config, self.tokenizer, config, blocks)
            except BaseException:
                backend.shutdown()
                raise

        self._loop = EngineLoop(make_engine)
        self.engine = self._loop.engine
        self._ids = itertools.count()
        self._closed = False
        self._grammars: Grammars | None = None  # built on the first structured request (~0.2 s)
        self._grammars_lock = threading.Lock()

    @property
    def backend(self) -> Backend:
        return self.engine.backend

    def encode(self, prompt: Prompt) -> list[int]:
        """Token ids of a text prompt (with bos), or the ids given; `RequestError` (param `prompt`)
        for text when the model has no tokenizer."""
        if not isinstance(prompt, str):
            return list(prompt)
        return self._tokenizer_for("prompt").encode(prompt)

    def encode_chat(
        self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None = None
    ) -> list[int]:
        """Token ids of an OpenAI-style conversation (and the tools it may call) in the Mistral chat
        format; `RequestError` (param `messages`) for one that format cannot hold, or when the model
        has no tokenizer."""
        try:
            return self._tokenizer_for("messages").encode_chat(messages, tools)
        except ChatFormatError as e:
            raise RequestError(str(e), "messages") from e

    def decode(self, token_ids: Sequence[int]) -> str:
        """Text of token ids; `RequestError` (param `tokens`) when the model has no tokenizer."""
        return self._tokenizer_for("tokens").decode(token_ids)

    def grammar(self, params: SamplingParams) -> Grammar | None:
        """The compiled grammar of a structured request (None for a free one); `RequestError` naming
        the field for a grammar that cannot be compiled. Compiling takes this thread, never the
        engine loop's; the same spec compiles once."""
        if params.structured is None:
            return None
        with self._grammars_lock:
            if self._grammars is None:
                tokenizer = self._tokenizer_for(params.structured.param)
                self._grammars = Grammars(tokenizer, self.model_config.vocab_size)
        try:
            return self._grammars.compile(params.structured)
        except GrammarError as e:
            raise RequestError(e.message, e.param, "invalid_grammar") from e

    def _tokenizer_for(self, param: str) -> Tokenizer:
        if self.tokenizer is None:
            raise RequestError(Tokenizer.missing(self.checkpoint, self.model_config.vocab_size), param)
        return self.tokenizer

    def generate(self, prompts: Sequence[Prompt], params: SamplingParams | None = None) -> list[RequestOutput]:
        """Run every prompt to completion (batched continuously); the finished outputs in prompt order,
        and with `n` > 1 each prompt's `n` choices in index order."""
        params = params or SamplingParams()
        done: dict[tuple[str, int], RequestOutput] = {}
        remaining = len(prompts)
        all_done = threading.Event()
        lock = threading.Lock()
        ids = [f"gen-{next(self._ids)}" for _ in prompts]

        def on_output(out: RequestOutput) -> None:
            nonlocal remaining
            if out.finished:
                with lock:
                    done[out.request_id, out.index] = out
                    remaining -= out.request_finished
                    if remaining == 0:
                        all_done.set()

        requests = [self.check(p, params) for p in prompts]
        grammar = self.grammar(params)
        futures = self._loop.submit_all([(rid, r, on_output, grammar) for rid, r in zip(ids, requests, strict=True)])
        try:
            for f in futures:
                f.result()
        except BaseException:
            for rid in ids:
                self._loop.abort(rid)
            raise
        if ids:
            all_done.wait()
        outputs = [done[key] for rid in ids for key in sorted(k for k in done if k[0] == rid)]
        failed = [o for o in outputs if o.error]
        if failed:
            raise _failure(failed[0])
        return outputs

    async def stream(
        self, prompt: Prompt | CheckedRequest, params: SamplingParams | None = None, request_id: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        """Yield an update per step and choice with its new tokens/text (`index` says which choice);
        closing the iterator aborts the request."""
        updates = await self.open_stream(prompt, params, request_id)
        try:
            async for out in updates:
                yield out
        finally:
            await updates.aclose()  # aborts the request if it has not finished

    async def open_stream(
        self, prompt: Prompt | CheckedRequest, params: SamplingParams | None = None, request_id: str | None = None
    ) -> AsyncGenerator[RequestOutput, None]:
        """Queue a request (a prompt with its settings, or a request `check` has passed) and return its
        updates; closing them (`aclose`) aborts the request. A request that can never run raises
        `RequestError` here, before any update; a down engine `EngineError`."""
        loop = asyncio.get_running_loop()
        updates: asyncio.Queue[RequestOutput] = asyncio.Queue()
        rid = request_id or f"stream-{next(self._ids)}"

        def on_output(out: RequestOutput) -> None:
            loop.call_soon_threadsafe(updates.put_nowait, out)

        request = prompt if isinstance(prompt, CheckedRequest) else self.check(prompt, params)
        params = request.params
        grammar = await asyncio.to_thread(self.grammar, params) if params.structured is not None else None
        await asyncio.wrap_future(self._loop.submit(rid, request, on_output, grammar))
        return self._updates(rid, updates)

    async def _updates(self, rid: str, updates: asyncio.Queue[RequestOutput]) -> AsyncGenerator[RequestOutput, None]:
        finished = False
        try:
            while not finished:
                out = await updates.get()
                if out.error:
                    raise _failure(out)
                finished = out.request_finished
                yield out
        finally:
            if not finished:
                self._loop.abort(rid)

    def check(self, prompt: Prompt, params: SamplingParams | None = None) -> CheckedRequest:
        """The prompt encoded and the request checked (`Engine.check_request`, safe from any thread):
        `RequestError` now for a request that can never run. `open_stream` takes what it returns."""
        return self.engine.check_request(self.encode(prompt), params or SamplingParams())

    def abort(self, request_id: str) -> None:
        self._loop.abort(request_id)

    def expert_token_counts(self) -> torch.Tensor:
        """Tokens routed to each expert so far, per layer: [L, E]."""
        return self._loop.call(self.engine.expert_counts)

    def stats(self) -> dict[str, Any]:
        """Running / waiting sequences, KV blocks in use, and since the experts were last placed the
        (token, expert) pairs per expert group and their imbalance (`ExpertBalancer.load`); read between steps."""
        return self._loop.call(
            lambda: (
                {
                    "running": self.engine.num_running(),
                    "waiting": self.engine.num_waiting(),
                    "blocks_in_use": self.engine.blocks_in_use(),
                }
                | self.engine.expert_load()
            )
        )

    def rebalance(self, timeout_s: float = 600.0, placement: AnyPlacement | None = None) -> dict[str, Any]:
        """Place the experts anew from the load since the last placement (or as `placement`,
        [layer][group] -> experts in slot order, says: to compare placements, or pin one), move the
        weights that must move while requests go on, and switch between two steps. Returns the
        placement, the imbalance before (measured) and after (for the same load), and the expert
        weights moved. `RebalanceUnavailable` for a single-process copy; ValueError for a placement
        that does not fit the copy's slots."""
        done: concurrent.futures.Future[dict[str, Any]] = concurrent.futures.Future()
        self._loop.call(lambda: self.engine.rebalance(done, placement))
        try:
            return done.result(timeout=timeout_s)  # EngineError if the engine fails first
        except concurrent.futures.TimeoutError:
            raise TimeoutError(f"the re-placement did not finish within {timeout_s:.0f} s") from None

    def profile(self, on: bool = True) -> None:
        """Start (or stop) recording per-step timings: the engine's and, on Ray, each worker's phases."""

        def switch() -> None:
            self.engine.profile = on
            self.engine.step_records.clear()
            self.backend.set_profiling(on)

        self._loop.call(switch)

    def step_profile(self) -> dict[str, Any]:
        """Records since `profile(True)`, one per step: {"engine": [...], "workers": {name: [...]}}.

        Every worker runs every step, so the i-th record of each list is the same step."""

        def take() -> dict[str, Any]:
            engine, self.engine.step_records = self.engine.step_records, []
            return {"engine": engine, "workers": self.backend.reports("step_times")}

        return self._loop.call(take)

    @property
    def error(self) -> str | None:
        return self._loop.error

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._loop.stop()
        self.engine.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def _failure(out: RequestOutput) -> Exception:
    """The exception for a request that ended in error: the engine's, or its own alone."""
    assert out.error is not None
    return EngineError(out.error) if out.engine_failed else RequestFailed(out.error)
