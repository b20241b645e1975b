"""Decode steps at fixed shapes, captured once per padded batch size as CUDA graphs.

Shape legend: M = the largest captured batch, S = sequences of a step padded to a captured size,
W = block-table entries per sequence, V = vocab, L = layers, E = experts.

On a GPU a batch-1 decode step is hundreds of small kernels, and launching them from Python
takes longer than running them. A CUDA graph replays a recorded step with one launch, but it
needs every input at a fixed shape and address, and nothing in the step may read the device
back. A decode step (one new token per sequence) is fixed in shape at a given batch size except
for attention's key count. Given to the paged decode kernel as block tables [S, W] (W entries
cover `max_model_len`), a first key position and a key count per sequence, every input is
fixed: tokens, positions, first keys, key counts and write slots [S], block tables [S, W].

`DecodeGraphs` keeps those inputs as buffers of the largest size M and runs the layers on their
first S rows: recorded and replayed on a GPU (`capture=True`), run as they are elsewhere (how
the tests check everything but the recording on CPU). A step of n sequences runs at the smallest
size S >= n; the padding rows are token 0 at position 0 with one key, in a scratch block that
the scheduler never hands out (the cache has one block more than it manages), so they read and
write only there, and their routed tokens count 0 in the expert counters.

The kernels must not read the device back (`CudaKernels`); the reference ones do (the expert
loop, block tables expanded to slots), so they run only uncaptured.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from model.attention_plan import AttentionGroup, AttentionPlan, first_visible
from model.kernels import CudaKernels
from model.kv_cache import CacheBatch, KVCache
from model.mixtral import Mixtral
from model.rope import cos_sin

logger = logging.getLogger(__name__)

BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


class DecodeGraphs:
    """A whole model's decode step at the padded batch sizes `sizes` (at most `max_seqs`)."""

    def __init__(
        self, model: Mixtral, cache: KVCache, max_model_len: int, max_seqs: int, capture: bool,
        sizes: Sequence[int] = BATCH_SIZES,
    ) -> None:  # fmt: skip
        if capture and not isinstance(model.kernels, CudaKernels):
            raise ValueError(f"recording decode steps needs kernels that never read the device back ('cuda'), "
                             f"not {model.kernels.name!r}")  # fmt: skip
        cfg = model.config
        device = cache.k.device
        self.model, self.cache = model, cache
        self.block_size = cache.block_size
        self.scratch_block = cache.num_blocks - 1  # the block the scheduler does not manage
        self.sizes = sorted({s for s in sizes if s < max_seqs} | {min(max_seqs, max(sizes))})
        m = self.sizes[-1]
        width = -(-max_model_len // self.block_size) + 1  # [W] every block a sequence may hold, and one spare

        def buffer(*shape: int, dtype: torch.dtype = torch.long) -> torch.Tensor:
            return torch.zeros(*shape, dtype=dtype, device=device)

        self.tokens, self.positions, self.first, self.key_lens = (buffer(m) for _ in range(4))  # [M] each
        self.write_slots, self.count_weights = buffer(m), buffer(m)  # [M] each
        self.tables = buffer(m, width, dtype=torch.int32)  # [M, W]
        self.counts = buffer(cfg.num_layers, cfg.num_experts)  # [L, E] routed tokens of the last step
        # staging on the host: one copy of each input per step (pinned so the copies are asynchronous)
        pin = device.type == "cuda"
        self._host = torch.zeros(6, m, dtype=torch.long, pin_memory=pin)  # tokens, positions, first, lens, slots, w
        self._host_tables = torch.zeros(m, width, dtype=torch.int32, pin_memory=pin)
        self.logits: dict[int, torch.Tensor] = {}  # S -> [S, V], the output of that size's step
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        if capture:
            self._record()

    def fits(self, num_seqs: int) -> bool:
        return 0 < num_seqs <= self.sizes[-1]

    @torch.inference_mode()
    def step(
        self, tokens: Sequence[int], positions: Sequence[int], block_tables: Sequence[Sequence[int]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One decode step of n sequences: their new token, its position and their block table ->
        logits [n, V] and the tokens routed to each expert [L, E] (both valid until the next step)."""
        n = len(tokens)
        size = next(s for s in self.sizes if s >= n)
        window = self.model.config.sliding_window
        b, scratch = self.block_size, self.scratch_block
        host, tables = self._host, self._host_tables
        host[:, n:size] = torch.tensor([0, 0, 0, 1, scratch * b, 0])[:, None]  # padding rows: one key, in scratch
        tables[n:size] = scratch
        for i, (token, pos, table) in enumerate(zip(tokens, positions, block_tables, strict=True)):
            first = first_visible(pos, window)
            host[:, i] = torch.tensor([token, pos, first, pos - first + 1, table[pos // b] * b + pos % b, 1])
            tables[i, : len(table)] = torch.tensor(table, dtype=torch.int32)
        for dst, src in zip((self.tokens, self.positions, self.first, self.key_lens, self.write_slots,
                             self.count_weights), host, strict=True):  # fmt: skip
            dst[:size].copy_(src[:size], non_blocking=True)
        self.tables[:size].copy_(tables[:size], non_blocking=True)
        if size in self.graphs:
            self.graphs[size].replay()
        else:
            self.logits[size] = self._run(size)
        return self.logits[size][:n], self.counts

    def _run(self, size: int) -> torch.Tensor:
        """The step on the buffers' first `size` rows -> logits [size, V]; what a graph records."""
        model, cfg = self.model, self.model.config
        cos, sin = cos_sin(self.positions[:size], cfg.head_dim, cfg.rope_theta, model.embed_tokens.weight.dtype)
        rows = torch.arange(size, device=self.tokens.device)[:, None]  # [S, 1]
        group = AttentionGroup(rows, self.tables[:size], None, self.key_lens[:size], self.first[:size],
                               self.block_size)  # fmt: skip
        plan = AttentionPlan([group], self.write_slots[:size])
        self.counts.zero_()
        moe = model.local_moe(self.counts, self.count_weights[:size])
        h = model.layer_loop(self.tokens[:size], cos, sin, plan, CacheBatch(self.cache, []), moe)
        return model.lm_head(h)  # [S, V]

    def _record(self) -> None:
        """Record every size's step, largest first, all in one memory pool."""
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()  # type: ignore[no-untyped-call]
        for size in reversed(self.sizes):
            # padding rows everywhere: the recording runs the step for real (on the scratch block)
            self.key_lens.fill_(1)
            self.write_slots.fill_(self.scratch_block * self.block_size)
            self.tables.fill_(self.scratch_block)
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream), torch.inference_mode():
                self._run(size)  # warm-up outside the recording: Triton compiles, cuBLAS picks its kernels
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool), torch.inference_mode():
                self.logits[size] = self._run(size)
            self.graphs[size] = graph
        torch.cuda.synchronize()
        logger.info("recorded decode steps as CUDA graphs at batch sizes %s", self.sizes)
