"""What an attention shard runs across steps: its paged KV cache, its sequences' block tables,
and the sampler that keeps their draw state. The single-process backend and the `AttentionShard`
actor both run a shard on `ShardRunner` (and differ only in the forward around it), so they
sample identically.

Shape legend: T = packed tokens of the shard's step, S = sequences, R = rows that need logits,
V = vocab, K = alternatives reported per position.

`pack` turns a shard's batch (`protocol.step.ShardBatch`) into the tensors `model.Mixtral`
takes, and `Sampler` draws the next token of each chunk that ends its sequence with the
request's own generator, and scores the prompt tokens of chunks that ask for it. A sequence's
settings arrive once, with its first draw here, and stay in its `DrawState` (with the prompt's and
the drawn tokens penalties need).

Logprobs are the fp32 log-softmax of the model's logits, before the request's controls (logit
bias, penalties, a grammar's mask), temperature, min-p, top-k and top-p (what vLLM reports by
default).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from model.config import ModelConfig
from model.decode_graphs import DecodeGraphs
from model.kv_cache import CacheBatch, KVCache
from model.sampling import DrawParams, adjust, allowed_tokens, make_generator, sample
from protocol.step import Draw, Sampled, SeqChunk, ShardBatch, TokenLogprobs

if TYPE_CHECKING:
    from model.mixtral import Mixtral


@dataclass
class Packed:
    tokens: torch.Tensor  # [T]
    positions: torch.Tensor  # [T] on the CPU
    seq_lens: list[int]
    block_tables: list[list[int]]
    logit_rows: torch.Tensor  # [R] the rows whose logits the step computes
    spans: list[tuple[int, int]]  # per chunk, its rows' range in those R logits


def pack(batch: ShardBatch, block_tables: list[list[int]], device: torch.device | str) -> Packed:
    """The batch's chunks as the model's tensors; `block_tables`: each chunk's whole table."""
    seq_lens = [len(c.tokens) for c in batch.chunks]
    tokens = [t for c in batch.chunks for t in c.tokens]
    positions = [c.start + i for c in batch.chunks for i in range(len(c.tokens))]
    rows: list[int] = []
    spans = []
    end = 0
    for c, n in zip(batch.chunks, seq_lens, strict=True):
        end += n
        first = len(rows)
        rows.extend(range(end - c.logit_rows, end))  # the chunk's last rows
        spans.append((first, len(rows)))
    return Packed(
        torch.tensor(tokens, dtype=torch.long, device=device),
        torch.tensor(positions, dtype=torch.long),  # stays on the host: the attention plan is built there
        seq_lens,
        block_tables,
        torch.tensor(rows, dtype=torch.long, device=device),
        spans,
    )


@dataclass
class DrawState:
    """A sequence's draw on its shard, kept across steps (the persistent half of a step's batch):
    its settings, its generator (made at its first draw) and, under penalties, every token drawn."""

    params: DrawParams
    seed: int | None
    generator: torch.Generator | None = None
    output: list[int] | None = None  # the tokens drawn so far, kept only when penalties need them
    prompt_seen: list[int] = field(default_factory=list)

    def adjusts(self, c: SeqChunk) -> bool:
        """Whether the draw changes the logits first (and so cannot take the greedy fast path)."""
        return self.params.adjusts or c.allowed is not None or bool(c.banned)

    def adjusted(self, c: SeqChunk, row: torch.Tensor) -> torch.Tensor:
        """The draw row [V] after the settings' and the chunk's controls."""
        allowed = allowed_tokens(c.allowed, row.shape[-1], row.device) if c.allowed is not None else None
        return adjust(row, self.params, self.output or (), self.prompt_seen, c.banned, allowed)

    def took(self, token: int) -> None:
        if self.output is not None:
            self.output.append(token)


class Sampler:
    """Per-sequence draw state (`DrawState`): set by a chunk that carries the draw's settings, kept
    across steps, dropped when the sequence finishes."""

    def __init__(self) -> None:
        self._states: dict[str, DrawState] = {}

    def prime(self, batch: ShardBatch) -> None:
        """Take the draw settings the batch's chunks carry (a sequence new to this shard, or one whose
        record the engine sends again after a step it threw away); a generator already made stays."""
        for c in batch.chunks:
            if c.params is None:
                continue
            old = self._states.get(c.request_id)
            output = list(c.output or []) if c.params.penalised else None
            seed, gen = (old.seed, old.generator) if old is not None else (c.params.seed, None)
            self._states[c.request_id] = DrawState(c.params, seed, gen, output, list(c.prompt_seen or []))

    def sample(self, batch: ShardBatch, logits: torch.Tensor, spans: list[tuple[int, int]]) -> list[Sampled]:
        """logits [R, V], the rows `pack` asked for; `spans` says which belong to which chunk."""
        out = []
        greedy = self._greedy_tokens(batch, logits, spans)
        for i, (c, (lo, hi)) in enumerate(zip(batch.chunks, spans, strict=True)):
            if lo == hi:
                continue
            try:  # this request's numbers, not the step's: a failure here ends it alone
                scored = self._score_prompt(c, logits[lo:hi]) if c.prompt_logprobs is not None else None
                if not c.sample:
                    out.append(Sampled(c.request_id, None, prompt_logprobs=scored))
                    continue
                state = self._state(c.request_id)
                if i in greedy:
                    state.took(greedy[i])
                    out.append(Sampled(c.request_id, greedy[i], None, scored))
                    continue
                raw = logits[hi - 1]  # [V]
                row = state.adjusted(c, raw) if state.adjusts(c) else raw  # [V]
                forks = [self._fork(state, d) for d in c.forks]  # before choice 0 takes its token
                out.append(self._draw(c.request_id, state, c, row, raw, scored))
                out += [self._draw(d.request_id, f, c, row, raw, None) for d, f in zip(c.forks, forks, strict=True)]
            except Exception as e:
                out.append(Sampled(c.request_id, None, error=f"sampling failed: {type(e).__name__}: {e}"))
        return out

    def _state(self, request_id: str) -> DrawState:
        state = self._states.get(request_id)
        if state is None:
            raise ValueError(f"{request_id}: this shard has no draw settings for it (its first draw carries them)")
        return state

    def _fork(self, state: DrawState, d: Draw) -> DrawState:
        """A new choice's draw state: choice 0's settings, its own seed, nothing drawn yet."""
        output: list[int] | None = [] if state.output is not None else None
        fork = self._states[d.request_id] = DrawState(state.params, d.seed, None, output, state.prompt_seen)
        return fork

    def _greedy_tokens(self, batch: ShardBatch, logits: torch.Tensor, spans: list[tuple[int, int]]) -> dict[int, int]:
        """The tokens of the chunks that draw one greedy token and report nothing else (no forks,
        no logprobs), chunk index -> token, from one argmax and one read back: on a GPU each
        `int(argmax)` would wait for the device once per sequence."""

        def plain_greedy(c: SeqChunk) -> bool:
            state = self._states.get(c.request_id)
            if not c.sample or state is None or c.forks or c.logprobs is not None:
                return False
            return state.params.greedy and not state.adjusts(c)

        pairs = enumerate(zip(batch.chunks, spans, strict=True))
        chunks = [i for i, (c, (lo, hi)) in pairs if lo < hi and plain_greedy(c)]
        if not chunks:
            return {}
        last = torch.tensor([spans[i][1] - 1 for i in chunks], device=logits.device)  # [G]
        tokens = logits.index_select(0, last).float().argmax(dim=-1).tolist()  # [G]
        return dict(zip(chunks, tokens, strict=True))

    def _draw(
        self,
        request_id: str,
        state: DrawState,
        c: SeqChunk,
        row: torch.Tensor,
        raw: torch.Tensor,
        scored: list[TokenLogprobs] | None,
    ) -> Sampled:
        """A token from `row` [V] (the logits after the controls); its logprobs from `raw` [V]."""
        if state.generator is None:
            state.generator = make_generator(state.seed, row.device)
        if state.adjusts(c) and not torch.isfinite(row).any():
            raise ValueError("no token is allowed: the grammar's mask, the banned ids and logit_bias exclude all")
        token = sample(row, state.params, state.generator)
        state.took(token)
        logprobs = None
        if c.logprobs is not None:
            logprobs = token_logprobs(raw[None], [token], c.logprobs)[0]
        return Sampled(request_id, token, logprobs, scored)

    def _score_prompt(self, c: SeqChunk, rows: torch.Tensor) -> list[TokenLogprobs]:
        """rows [n, V]: row i scores the token after the chunk's i-th (the next chunk's first, last)."""
        assert c.prompt_logprobs is not None
        targets = c.tokens[1:] + ([c.next_token] if c.next_token is not None else [])
        return token_logprobs(rows[: len(targets)], targets, c.prompt_logprobs)

    def drop(self, request_ids: list[str]) -> None:
        for r in request_ids:
            self._states.pop(r, None)

    def __len__(self) -> int:
        return len(self._states)


def token_logprobs(logits: torch.Tensor, tokens: list[int], k: int) -> list[TokenLogprobs]:
    """Each row's logprob of its token and its k most likely tokens: logits [N, V], tokens [N]."""
    if not tokens:
        return []
    lp = torch.log_softmax(logits.float(), dim=-1)  # [N, V] fp32
    chosen = lp.gather(1, torch.tensor(tokens, device=lp.device)[:, None])[:, 0].tolist()  # [N]
    if k > 0:
        top_values, top_ids = torch.topk(lp, k, dim=-1)  # [N, K]
        tops = [list(zip(i, v, strict=True)) for i, v in zip(top_ids.tolist(), top_values.tolist(), strict=True)]
    else:
        tops = [[] for _ in tokens]
    return [TokenLogprobs(t, c, top) for t, c, top in zip(tokens, chosen, tops, strict=True)]


DecodeGraphSpec = tuple["Mixtral", int, int]  # (the whole model, the longest sequence, the most sequences)


class ShardRunner:
    """One attention shard across steps: the paged KV cache of its sequences, their block tables
    (kept here and updated by each chunk's `new_blocks`, so a step carries only what changed) and
    the sampler that keeps their draw state (settings, generator, penalties' tokens: sent once). A
    step is `begin` (forget finished sequences, copy forked choices' last blocks before anything
    writes, take new draw settings, update the tables), then, if the shard has
    chunks, `replay` (a decode step through the decode graphs, where the shard has them) or `pack`
    and the forward (in this process, or with the MoE halves over the data plane), and `draw`."""

    def __init__(
        self, config: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device,
        graphs: DecodeGraphSpec | None = None,
    ) -> None:  # fmt: skip
        """`graphs`: replay decode steps at fixed shapes through `model.decode_graphs.DecodeGraphs`
        (the whole model's, so only where the shard runs the MoE itself: one process), recorded as
        CUDA graphs on a GPU; the cache gets their scratch block on top of `num_blocks`."""
        extra = 0 if graphs is None else 1
        self.cache = KVCache.allocate(config, num_blocks + extra, block_size, dtype, device)
        self.sampler = Sampler()
        self.tables: dict[str, list[int]] = {}  # by request id
        self._drawn_step = 0  # the last numbered step this shard drew (`ShardBatch.step`), and its draws
        self._drawn: list[Sampled] = []
        self.graphs: DecodeGraphs | None = None
        if graphs is not None:
            model, max_len, max_seqs = graphs
            self.graphs = DecodeGraphs(model, self.cache, max_len, max_seqs, capture=device.type == "cuda")

    def begin(self, batch: ShardBatch) -> None:
        self.sampler.drop(batch.finished)
        for request_id in batch.finished:
            self.tables.pop(request_id, None)
        self.cache.copy_blocks(batch.copies)
        if not self.repeats(batch):  # a step run again: its settings were taken the first time
            self.sampler.prime(batch)
        for c in batch.chunks:
            table = self.tables.setdefault(c.request_id, [])
            if c.blocks_from > len(table):
                raise ValueError(
                    f"{c.request_id}: its block table changes from entry {c.blocks_from}, but this shard "
                    f"holds {len(table)} entries of it"
                )
            del table[c.blocks_from :]
            table.extend(c.new_blocks)

    def repeats(self, batch: ShardBatch) -> bool:
        """Whether this shard has drawn this step already: the backend runs a step again after
        replacing a router or an expert group that died once this shard was done with it (the
        forward runs again, for the data plane's exchanges; the draws must not)."""
        return batch.step > 0 and batch.step == self._drawn_step

    def draw(self, batch: ShardBatch, logits: torch.Tensor, spans: list[tuple[int, int]]) -> list[Sampled]:
        """The step's draws from logits [R, V] (`Sampler.sample`); a step run again gets the draws
        of its first run, so each generator and each penalties' record advances once per step."""
        if not self.repeats(batch):
            self._drawn_step, self._drawn = batch.step, self.sampler.sample(batch, logits, spans)
        return self._drawn

    def block_tables(self, batch: ShardBatch) -> list[list[int]]:
        """Each chunk's whole block table (after `begin`)."""
        return [self.tables[c.request_id] for c in batch.chunks]

    def replay(self, batch: ShardBatch) -> tuple[torch.Tensor, torch.Tensor] | None:
        """A decode step the graphs hold (one token and one row of logits per chunk, few enough
        chunks), replayed: logits [S, V] and tokens per expert [L, E]. None for any other step (run
        the forward)."""
        if self.graphs is None or not self.graphs.fits(len(batch.chunks)):
            return None
        if not all(len(c.tokens) == 1 and c.logit_rows == 1 for c in batch.chunks):
            return None
        starts = [c.start for c in batch.chunks]
        return self.graphs.step([c.tokens[0] for c in batch.chunks], starts, self.block_tables(batch))

    def pack(self, batch: ShardBatch) -> tuple[Packed, CacheBatch]:
        """The batch's chunks as the model's tensors, and the cache seen through their block tables."""
        p = pack(batch, self.block_tables(batch), self.cache.k.device)
        return p, CacheBatch(self.cache, p.block_tables)
