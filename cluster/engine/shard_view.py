"""What the engine knows each attention shard holds, and the per-shard batches of a step.

A shard keeps its sequences' block tables and draw settings across steps (`protocol.shard_runner`),
so a step sends it only what changed: the entries of a table it has not seen (`new_blocks` from
`blocks_from`), a sequence's draw settings the first time it draws there, the sequences to forget
and the blocks to copy for forks. `ShardView` is the engine's mirror of that: it turns a step's
chunks into one `ShardBatch` per shard with those deltas, and forgets what a replaced shard held.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cluster.engine.sequence import Sequence as SchedSeq
from model.sampling import DrawParams
from protocol.step import SeqChunk, ShardBatch

DrawRecord = tuple[DrawParams, list[int] | None, list[int] | None]  # settings, tokens drawn, the prompt's ids


@dataclass
class Work:
    """One scheduled chunk as the request sees it, before the shard's deltas are filled in."""

    seq: SchedSeq
    chunk: SeqChunk  # the request's part: tokens, what to report, this step's draw controls
    record: Callable[[], DrawRecord] | None  # where it draws: its settings, sent where its shard lacks them


class ShardView:
    """Per shard: each sequence's block table as the shard has it, the sequences whose draw settings
    it keeps, and what it must drop or copy before its next step."""

    def __init__(self, num_shards: int) -> None:
        self.num_shards = num_shards
        self._tables: list[dict[str, list[int]]] = [{} for _ in range(num_shards)]
        self._primed: list[set[str]] = [set() for _ in range(num_shards)]
        self._drops: list[list[str]] = [[] for _ in range(num_shards)]
        self._copies: list[list[tuple[tuple[int, int], str]]] = [[] for _ in range(num_shards)]

    def batches(self, step: int, work: Sequence[Work], alive: Callable[[str], bool]) -> list[ShardBatch]:
        """Step `step`'s batch for every shard: its chunks with their deltas, the sequences it may
        forget, and the copies of forks (`alive`) still running."""
        batches = [
            ShardBatch(finished=drops, step=step, copies=[pair for pair, seq_id in copies if alive(seq_id)])
            for drops, copies in zip(self._drops, self._copies, strict=True)
        ]
        self._drops = [[] for _ in range(self.num_shards)]
        self._copies = [[] for _ in range(self.num_shards)]
        for w in work:
            shard, seq_id, chunk = w.seq.shard, w.seq.request_id, w.chunk
            table, tables = w.seq.block_table, self._tables[shard]
            known = _unchanged(tables.get(seq_id, []), table)  # entries the shard has already
            tables[seq_id] = list(table)
            chunk.new_blocks, chunk.blocks_from = table[known:], known
            if w.record is not None and seq_id not in self._primed[shard]:  # kept by the shard from now on
                self._primed[shard].add(seq_id)
                chunk.params, chunk.output, chunk.prompt_seen = w.record()
            batches[shard].chunks.append(chunk)
        return batches

    def fork(self, child: SchedSeq, copy: tuple[int, int] | None) -> None:
        """A choice forked on its shard: the shard made its draw state when it drew its first token,
        and copies `copy` (the partly filled last block) before its next step."""
        self._primed[child.shard].add(child.request_id)
        if copy is not None:
            self._copies[child.shard].append((copy, child.request_id))

    def release(self, seq: SchedSeq) -> None:
        """A sequence that finished: its shard forgets it with its next step."""
        if seq.shard >= 0:
            self._drops[seq.shard].append(seq.request_id)
            self._tables[seq.shard].pop(seq.request_id, None)
            self._primed[seq.shard].discard(seq.request_id)

    def lost(self, shards: Sequence[int]) -> None:
        """Shards replaced: they hold nothing. The others drew tokens in a step nobody takes, so their
        sequences' records (penalties' tokens) are sent again."""
        for shard in shards:
            self._drops[shard], self._copies[shard], self._tables[shard] = [], [], {}
        for primed in self._primed:
            primed.clear()


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
