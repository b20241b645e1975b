"""`LLM`: the public offline and streaming API, in the spirit of vLLM's.

    llm = LLM(checkpoint=dir, attention_shards=2, routers=1, expert_groups=4, device="cpu")
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
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch

from cluster.engine import Backend, Engine, EngineError, LocalBackend, RequestOutput, SamplingParams
from cluster.kv_cache import blocks_for_budget
from cluster.placement import Layout
from model.config import ModelConfig
from model.loader import load_model
from model.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

Prompt = str | Sequence[int]
OnOutput = Callable[[RequestOutput], None]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_KV_BYTES = 64 << 20  # per attention shard; ample for the tiny model, set it for real ones


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


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
        self, request_id: str, prompt: list[int], params: SamplingParams, on_output: OnOutput
    ) -> concurrent.futures.Future[None]:
        """Queue a request; the future fails with ValueError (bad request) or EngineError (engine down)."""
        return self.submit_all([(request_id, prompt, params, on_output)])[0]

    def submit_all(
        self, requests: Sequence[tuple[str, list[int], SamplingParams, OnOutput]]
    ) -> list[concurrent.futures.Future[None]]:
        """Queue requests as one command, so the first step already schedules all of them."""
        futures: list[concurrent.futures.Future[None]] = [concurrent.futures.Future() for _ in requests]

        def add_all() -> None:
            for (request_id, prompt, params, on_output), fut in zip(requests, futures, strict=True):
                if self.error is not None:
                    fut.set_exception(EngineError(self.error))
                    continue
                try:
                    self.engine.add_request(request_id, prompt, params)
                except ValueError as e:
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
                    cmd = self._commands.get(block=not self.engine.has_work)
                except queue.Empty:
                    cmd = _STEP
                if cmd is None:
                    return
                if cmd is not _STEP:
                    cmd()
                    continue  # drain every queued command before the next step
                try:
                    outputs = self.engine.step()
                except Exception as e:
                    logger.exception("engine step failed")
                    self.error = f"the engine failed and cannot serve any more: {e}"
                    self._deliver(self.engine.fail_all(self.error))
                    return
                self._deliver(outputs)
        finally:
            with self._lock:
                self._closed = True
            while not self._commands.empty():  # answer what was queued: add() refuses once error is set
                cmd = self._commands.get_nowait()
                if cmd is not None and cmd is not _STEP:
                    self.error = self.error or "the engine is shut down"
                    cmd()

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            sub = self._subscribers.get(out.request_id)
            if out.finished:
                self._subscribers.pop(out.request_id, None)
            if sub is not None:
                sub(out)


def _step() -> None:
    """Sentinel command: run one engine step."""


_STEP = _step


class LLM:
    """One model copy: in this process (`single_process=True`) or spread over Ray actors."""

    def __init__(
        self,
        checkpoint: str | Path,
        attention_shards: int = 1,
        routers: int = 1,
        expert_groups: int = 1,
        device: Literal["cpu", "cuda"] = "cpu",
        dtype: torch.dtype | str = torch.float32,
        single_process: bool = False,
        ray_address: str | None = None,
        block_size: int = 16,
        kv_cache_bytes: int = DEFAULT_KV_BYTES,
        num_blocks: int | None = None,
        max_batched_tokens: int = 512,
        max_seqs: int = 256,
        max_model_len: int | None = None,
        placement_strategy: str = "PACK",
        placement_timeout_s: float = 120.0,
        worker_resources: dict[str, float] | None = None,
        torch_threads: int = 1,
        step_timeout_s: float = 300.0,
        device_memory_bytes: int = 80 * 10**9,
        placement: Any = None,
        bundle_offset: int = 0,
    ) -> None:
        self.checkpoint = Path(checkpoint)
        self.dtype = resolve_dtype(dtype)
        self.config = ModelConfig.from_checkpoint(self.checkpoint)
        self.tokenizer = Tokenizer.for_checkpoint(self.checkpoint)
        if self.tokenizer.vocab_size > self.config.vocab_size:
            raise ValueError(
                f"the tokenizer has {self.tokenizer.vocab_size} pieces but the model only {self.config.vocab_size}"
            )
        blocks = num_blocks or blocks_for_budget(self.config, block_size, self.dtype, kv_cache_bytes)
        self.layout = Layout(1, 1, 1) if single_process else Layout(attention_shards, routers, expert_groups)
        backend: Backend | None = None
        if not single_process:
            from cluster.workers import RayBackend  # Ray is only needed for the distributed path

            backend = RayBackend(
                self.checkpoint,
                self.config,
                self.layout,
                device=device,
                dtype=self.dtype,
                num_blocks=blocks,
                block_size=block_size,
                ray_address=ray_address,
                strategy=placement_strategy,
                placement_timeout_s=placement_timeout_s,
                worker_resources=worker_resources,
                torch_threads=torch_threads,
                step_timeout_s=step_timeout_s,
                device_memory_bytes=device_memory_bytes,
                placement=placement,
                bundle_offset=bundle_offset,
            )

        def make_engine() -> Engine:
            # One process, one thread for all its tensor work: with two threads each owning an
            # OpenMP pool on a machine with no spare cores, libgomp stops its workers spinning
            # between parallel regions and every op waits on a futex wake (measured: the mini
            # workload 7.2 s instead of 4.9 s when the model was loaded on the caller's thread).
            model_backend = backend or LocalBackend(load_model(self.checkpoint, self.dtype, device), blocks, block_size)
            return Engine(
                model_backend,
                self.config,
                self.tokenizer,
                blocks_per_shard=blocks,
                block_size=block_size,
                max_batched_tokens=max_batched_tokens,
                max_seqs=max_seqs,
                max_model_len=max_model_len,
            )

        try:
            self._loop = EngineLoop(make_engine)
        except BaseException:
            if backend is not None:
                backend.shutdown()
            raise
        self.engine = self._loop.engine
        self._ids = itertools.count()
        self._closed = False

    @property
    def backend(self) -> Backend:
        return self.engine.backend

    def encode(self, prompt: Prompt) -> list[int]:
        return self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)

    def generate(self, prompts: Sequence[Prompt], params: SamplingParams | None = None) -> list[RequestOutput]:
        """Run every prompt to completion (batched continuously); outputs in prompt order."""
        params = params or SamplingParams()
        done: dict[str, RequestOutput] = {}
        all_done = threading.Event()
        lock = threading.Lock()
        ids = [f"gen-{next(self._ids)}" for _ in prompts]

        def on_output(out: RequestOutput) -> None:
            if out.finished:
                with lock:
                    done[out.request_id] = out
                    if len(done) == len(ids):
                        all_done.set()

        futures = self._loop.submit_all(
            [(rid, self.encode(p), params, on_output) for rid, p in zip(ids, prompts, strict=True)]
        )
        try:
            for f in futures:
                f.result()
        except BaseException:
            for rid in ids:
                self._loop.abort(rid)
            raise
        if ids:
            all_done.wait()
        errors = [o.error for o in done.values() if o.error]
        if errors:
            raise EngineError(errors[0])
        return [done[rid] for rid in ids]

    async def stream(
        self, prompt: Prompt, params: SamplingParams | None = None, request_id: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        """Yield an update per step with new tokens/text; closing the iterator aborts the request."""
        loop = asyncio.get_running_loop()
        updates: asyncio.Queue[RequestOutput] = asyncio.Queue()
        rid = request_id or f"stream-{next(self._ids)}"

        def on_output(out: RequestOutput) -> None:
            loop.call_soon_threadsafe(updates.put_nowait, out)

        fut = self._loop.submit(rid, self.encode(prompt), params or SamplingParams(), on_output)
        await asyncio.wrap_future(fut)
        finished = False
        try:
            while not finished:
                out = await updates.get()
                if out.error:
                    raise EngineError(out.error)
                finished = out.finished
                yield out
        finally:
            if not finished:
                self._loop.abort(rid)

    def abort(self, request_id: str) -> None:
        self._loop.abort(request_id)

    def expert_token_counts(self) -> torch.Tensor:
        """Tokens routed to each expert so far, per layer: [L, E]."""
        return self._loop.call(lambda: self.engine.expert_counts.clone())

    def stats(self) -> dict[str, int]:
        """Running / waiting sequences and KV blocks in use, read between steps."""
        return self._loop.call(
            lambda: {
                "running": self.engine.num_running(),
                "waiting": self.engine.num_waiting(),
                "blocks_in_use": self.engine.blocks_in_use(),
            }
        )

    def profile(self, on: bool = True) -> None:
        """Start (or stop) recording per-step timings: the engine's and, on Ray, each worker's phases."""

        def switch() -> None:
            self.engine.profile = on
            self.engine.step_records.clear()
            if hasattr(self.backend, "call_all"):
                self.backend.call_all("profile", on)

        self._loop.call(switch)

    def step_profile(self) -> dict[str, Any]:
        """Records since `profile(True)`, one per step: {"engine": [...], "workers": {name: [...]}}.

        Every worker runs every step, so the i-th record of each list is the same step."""

        def take() -> dict[str, Any]:
            engine, self.engine.step_records = self.engine.step_records, []
            workers: dict[str, Any] = {}
            backend: Any = self.backend
            if hasattr(backend, "call_all"):  # RayBackend
                names = [s.name for s in backend.specs]
                workers = dict(zip(names, backend.call_all("step_times"), strict=True))
            return {"engine": engine, "workers": workers}

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
