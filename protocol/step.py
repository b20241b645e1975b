"""The step protocol: what the engine sends every worker each step, and what comes back.

Shape legend: T = packed tokens of the shard's step, S = sequences, V = vocab.

Every worker gets the same `StepPlan` (via the object store): one `ShardBatch` per attention
shard, plain data and cheap to pickle; routers read the shards' sizes from it. `pack` turns a
shard's batch into the tensors `model.Mixtral` takes, and `Sampler` draws the next token of each
finished chunk with the request's own generator. The single-process engine and the
`AttentionShard` actor both use these, so they sample identically.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from model.sampling import SamplingParams, make_generator, sample


@dataclass
class SeqChunk:
    request_id: str
    tokens: list[int]  # the chunk's token ids
    start: int  # position of tokens[0]
    block_table: list[int]
    params: SamplingParams | None  # set when the chunk ends the sequence: sample a token
    logprobs: bool = False


@dataclass
class ShardBatch:
    chunks: list[SeqChunk] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)  # requests whose sampling state can be dropped

    @property
    def num_tokens(self) -> int:
        return sum(len(c.tokens) for c in self.chunks)


@dataclass
class StepPlan:
    batches: list[ShardBatch]  # one per attention shard, empty ones included


@dataclass
class Sampled:
    request_id: str
    token: int
    logprob: float | None
    error: str | None = None  # this request's sampling failed (e.g. its logits are not finite); only it ends


@dataclass
class Packed:
    tokens: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    seq_lens: list[int]
    block_tables: list[list[int]]
    logit_rows: torch.Tensor  # [S'] last row of each chunk that samples


def pack(batch: ShardBatch, device: torch.device | str) -> Packed:
    seq_lens = [len(c.tokens) for c in batch.chunks]
    tokens = [t for c in batch.chunks for t in c.tokens]
    positions = [c.start + i for c in batch.chunks for i in range(len(c.tokens))]
    ends = torch.tensor(seq_lens, dtype=torch.long).cumsum(0) - 1
    sampling = torch.tensor([c.params is not None for c in batch.chunks], dtype=torch.bool)
    return Packed(
        torch.tensor(tokens, dtype=torch.long, device=device),
        torch.tensor(positions, dtype=torch.long, device=device),
        seq_lens,
        [c.block_table for c in batch.chunks],
        ends[sampling].to(device),
    )


class Sampler:
    """Per-request generators, created at a request's first sample and dropped when it finishes."""

    def __init__(self) -> None:
        self._generators: dict[str, torch.Generator] = {}

    def sample(self, batch: ShardBatch, logits: torch.Tensor) -> list[Sampled]:
        """logits [S', V]: one row per sampling chunk, in batch order."""
        out = []
        rows = iter(range(logits.shape[0]))
        for c in batch.chunks:
            if c.params is None:
                continue
            row = logits[next(rows)]  # [V]
            try:
                gen = self._generators.get(c.request_id)
                if gen is None:
                    gen = self._generators[c.request_id] = make_generator(c.params.seed, logits.device)
                token = sample(row, c.params, gen)
                logprob = float(torch.log_softmax(row.float(), dim=-1)[token]) if c.logprobs else None
            except Exception as e:  # this request's numbers, not the step's: the others go on
                out.append(Sampled(c.request_id, -1, None, error=f"sampling failed: {type(e).__name__}: {e}"))
                continue
            out.append(Sampled(c.request_id, token, logprob))
        return out

    def drop(self, request_ids: list[str]) -> None:
        for r in request_ids:
            self._generators.pop(r, None)

    def __len__(self) -> int:
        return len(self._generators)
