"""The step protocol: what the engine sends every worker each step, and what comes back.

Each worker gets only its part of a step (`step_messages`): an attention shard its own
`ShardBatch` (plain data, cheap to pickle), a router its shards' token counts, an expert group
nothing; `python -m benchmarks.step_messages` measures what that saves over sending every worker
every shard's batch. What a shard does with its batch (its cache, tables, sampler) is
`protocol.shard_runner`'s.

A request's settings (`DrawParams`: temperature and cuts, seed, logit bias, banned ids,
penalties) travel once, with its first draw on a shard, which keeps them; what changes from step
to step travels with each chunk that draws: the grammar's allowed tokens as a bitmask the engine
computed from its matcher, and eos and the stop tokens while `min_tokens` bans them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from model.sampling import DrawParams
from protocol.worker import WorkerSpec

MAX_TOP_LOGPROBS = 20  # alternatives a request may ask for per position


@dataclass
class Draw:
    """Another choice drawn from a chunk's last logits: a choice of an `n` > 1 request, forked here."""

    request_id: str
    seed: int | None


@dataclass
class SeqChunk:
    request_id: str
    tokens: list[int]  # the chunk's token ids
    start: int  # position of tokens[0]
    # Its block table from entry `blocks_from` on (the shard keeps the entries before from earlier
    # steps: `protocol.shard_runner.ShardRunner.begin`); the whole table the first time, then what changed.
    new_blocks: list[int]
    sample: bool  # the chunk ends the sequence's known tokens: draw the next
    # The draw's settings, sent the first time this shard draws for the sequence (the shard keeps
    # them, `protocol.shard_runner.Sampler`), with what penalties need: the tokens drawn so far and the prompt's ids.
    params: DrawParams | None = None
    output: list[int] | None = None  # with params, when penalties need them
    prompt_seen: list[int] | None = None  # with params, the prompt's distinct ids for the repetition penalty
    logprobs: int | None = None  # report each sampled token's logprob with this many alternatives
    prompt_logprobs: int | None = None  # score the chunk's prompt tokens, with this many alternatives
    next_token: int | None = None  # the prompt token after the chunk, scored from its last row
    forks: list[Draw] = field(default_factory=list)  # more choices drawn from the same last logits
    blocks_from: int = 0  # the entry of its block table `new_blocks` starts at
    # This step's controls of the draw (see `model.sampling.adjust`); the forks' first draws share them.
    allowed: bytes | None = None  # a grammar's allowed tokens: bitmask, 32 tokens per little-endian int32
    banned: list[int] = field(default_factory=list)  # ids not drawn this step (eos before min_tokens)

    @property
    def logit_rows(self) -> int:
        """Rows of this chunk whose logits the step computes: every row when it scores the prompt."""
        if self.prompt_logprobs is not None:
            return len(self.tokens)
        return 1 if self.sample else 0


@dataclass
class ShardBatch:
    chunks: list[SeqChunk] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)  # requests whose sampling state can be dropped
    copies: list[tuple[int, int]] = field(default_factory=list)  # (source, destination) KV blocks, copied first
    # The engine's number for the step (0: none), the same each time the backend runs it again.
    step: int = 0

    @property
    def num_tokens(self) -> int:
        return sum(len(c.tokens) for c in self.chunks)


StepMessage = ShardBatch | list[int] | None  # one worker's part of a step (`step_messages`)


def step_messages(batches: Sequence[ShardBatch], specs: Sequence[WorkerSpec]) -> list[StepMessage]:
    """Each worker's part of one step, in `specs` order: an attention shard its own batch, a router
    the token counts of its shards (in `WorkerSpec.shards` order: the rows it will receive), an
    expert group nothing (its rows and their experts arrive over the data plane)."""
    out: list[StepMessage] = []
    for spec in specs:
        if spec.role == "attention":
            out.append(batches[spec.index])
        elif spec.role == "router":
            out.append([batches[a].num_tokens for a in spec.shards])
        else:
            out.append(None)
    return out


@dataclass
class TokenLogprobs:
    token: int
    logprob: float
    top: list[tuple[int, float]]  # the most likely tokens with their logprobs, most likely first


@dataclass
class Sampled:
    """One request's outcome of a step on its shard."""

    request_id: str
    token: int | None  # None: nothing drawn (a scored prompt chunk before the last)
    logprobs: TokenLogprobs | None = None
    prompt_logprobs: list[TokenLogprobs] | None = None  # the positions after each of the chunk's tokens
    error: str | None = None  # this request failed here (e.g. its logits are not finite); only it ends
