"""The attention plan: which keys each query of a forward call sees, as index tensors.

Shape legend: T = packed tokens of the call, S = sequences in one attention group, Tq / Tk =
queries / keys per sequence (padded within a group).

Several sequences are packed flat (`seq_lens` tokens each). Query i of a sequence may see key j
of the same sequence when `pos_j <= pos_i` and, with a sliding window W, `pos_i - W < pos_j`.
Sequences never see each other. `plan_attention` turns positions, lengths and block tables
into index tensors once per forward; every layer (and the attention kernel) reuses that plan.
It works on the host (positions on the CPU, from the scheduler's lists) and moves the finished
index tensors to the model's device once: on a GPU, none of its checks reads the device back.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from model.kv_cache import FREED

_FUTURE = 2**62  # key position given to padding: later than any query


@dataclass
class AttentionGroup:
    """Sequences attended by one SDPA call, padded to common query and key counts."""

    q_rows: torch.Tensor  # [S, Tq] rows of the packed tokens
    k_index: torch.Tensor  # [S, Tk] rows of the key store: the call's own keys, or pool slots with a cache
    mask: torch.Tensor | None  # [S, Tq, Tk] bool, True where the query sees the key; None: sees all
    key_lens: torch.Tensor | None = None  # [S] one-query groups: each query sees its first key_lens keys
    # One-query groups may instead list block tables (a CUDA graph's fixed-shape input): with
    # block_size B > 1, k_index [S, W] holds each sequence's block table and its keys are the
    # key_lens[s] positions from key_first[s] on; `as_slots` turns that into the form above.
    key_first: torch.Tensor | None = None  # [S]
    block_size: int = 1

    def to(self, device: torch.device) -> AttentionGroup:
        mask = None if self.mask is None else self.mask.to(device, non_blocking=True)
        key_lens = None if self.key_lens is None else self.key_lens.to(device, non_blocking=True)
        first = None if self.key_first is None else self.key_first.to(device, non_blocking=True)
        return AttentionGroup(self.q_rows.to(device, non_blocking=True), self.k_index.to(device, non_blocking=True),
                              mask, key_lens, first, self.block_size)  # fmt: skip

    def as_slots(self) -> AttentionGroup:
        """The group with k_index as pool slots [S, Tk] and its mask (block tables expanded; this
        reads the longest key count back from the device). Itself when it lists slots already."""
        if self.block_size == 1:
            return self
        assert self.key_lens is not None and self.key_first is not None, "block tables need key_lens and key_first"
        device, b = self.k_index.device, self.block_size
        width = int(self.key_lens.max())
        pos = self.key_first[:, None] + torch.arange(width, device=device)  # [S, Tk] key positions
        valid = torch.arange(width, device=device)[None] < self.key_lens[:, None]  # [S, Tk]
        column = torch.where(valid, pos // b, 0)  # [S, Tk] which entry of the table
        slots = torch.where(valid, self.k_index.gather(1, column).long() * b + pos % b, 0)  # [S, Tk]
        return AttentionGroup(self.q_rows, slots, valid[:, None], self.key_lens)


@dataclass
class AttentionPlan:
    groups: list[AttentionGroup]
    write_slots: torch.Tensor | None  # [T] pool slot of each new token; None without a cache

    def to(self, device: torch.device) -> AttentionPlan:
        """The plan's index tensors on `device` (one copy each; none when they are there already)."""
        slots = None if self.write_slots is None else self.write_slots.to(device, non_blocking=True)
        return AttentionPlan([g.to(device) for g in self.groups], slots)


def plan_attention(
    positions: torch.Tensor,
    seq_lens: Sequence[int],
    window: int | None,
    block_tables: Sequence[Sequence[int]] | None = None,
    block_size: int = 0,
) -> AttentionPlan:
    """Index tensors for one forward call.

    Without a cache each sequence's keys are its own new tokens. With one, new keys are written
    to `write_slots` and each sequence reads every cached position its queries may see, so the
    same call serves prefill, chunked prefill and decode. Single-token sequences (decode) share
    one padded group; longer ones get a group each (no quadratic padding across prompts).
    Built where `positions` are (pass them on the CPU); `AttentionPlan.to` moves it.
    """
    device = positions.device
    total = int(positions.shape[0])
    if sum(seq_lens) != total:
        raise ValueError(f"seq_lens sum to {sum(seq_lens)} but {total} positions were given")
    if block_tables is not None and len(block_tables) != len(seq_lens):
        raise ValueError(f"{len(block_tables)} block tables for {len(seq_lens)} sequences")

    groups: list[AttentionGroup] = []
    singles: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # (row, key index [Tk], key positions [Tk])
    write_slots: list[torch.Tensor] = []
    start = 0
    for s, n in enumerate(seq_lens):
        if n <= 0:
            raise ValueError(f"sequence {s} has {n} tokens; every packed sequence needs at least one")
        q_pos = positions[start : start + n]  # [Tq]
        first = int(q_pos[0])
        if n > 1 and not torch.equal(q_pos, torch.arange(first, first + n, device=device)):
            raise ValueError(f"positions of sequence {s} are not consecutive from {first}")
        if block_tables is None:
            k_pos = q_pos
            k_index = torch.arange(start, start + n, device=device)
        else:
            lo = first_visible(first, window)
            k_pos = torch.arange(lo, first + n, device=device)  # [Tk] every position the queries may see
            k_index = _slots(block_tables[s], lo, first + n, block_size, s, device)
            write_slots.append(k_index[-n:])
        if n == 1:
            singles.append((start, k_index, k_pos))
        else:
            rows = torch.arange(start, start + n, device=device)
            groups.append(AttentionGroup(rows[None], k_index[None], _mask(q_pos[None], k_pos[None], window)))
        start += n

    for bucket in _length_buckets(singles):
        rows = torch.tensor([r for r, _, _ in bucket], dtype=torch.long, device=device)[:, None]  # [S, 1]
        k_index = nn.utils.rnn.pad_sequence([k for _, k, _ in bucket], batch_first=True)  # [S, Tk]
        # Padded keys are placed in the far future, so the causal test alone hides them.
        k_pos = nn.utils.rnn.pad_sequence([p for _, _, p in bucket], batch_first=True, padding_value=_FUTURE)
        q_pos = positions[rows[:, 0]][:, None]  # [S, 1]
        key_lens = torch.tensor([k.shape[0] for _, k, _ in bucket], dtype=torch.long, device=device)  # [S]
        groups.append(AttentionGroup(rows, k_index, _mask(q_pos, k_pos, window), key_lens))
    slots = torch.cat(write_slots) if block_tables is not None else None
    return AttentionPlan(groups, slots)


def first_visible(position: int, window: int | None) -> int:
    """The first key position a query at `position` sees (all from 0 without a window)."""
    return 0 if window is None else max(0, position - window + 1)


def _length_buckets(
    singles: list[tuple[int, torch.Tensor, torch.Tensor]], min_fill: float = 0.75
) -> list[list[tuple[int, torch.Tensor, torch.Tensor]]]:
    """Decode sequences grouped by key count, so that padding stays under 1 - `min_fill` of a group.

    One padded group for all would gather (and attend over) every sequence at the longest one's
    length; with prompts of 8-512 tokens that is about half padding.
    """
    ordered = sorted(singles, key=lambda s: -s[1].shape[0])
    buckets: list[list[tuple[int, torch.Tensor, torch.Tensor]]] = []
    for item in ordered:
        if buckets and item[1].shape[0] >= min_fill * buckets[-1][0][1].shape[0]:
            buckets[-1].append(item)
        else:
            buckets.append([item])
    return buckets


def _slots(table: Sequence[int], lo: int, hi: int, block_size: int, seq: int, device: torch.device) -> torch.Tensor:
    """Flat pool slots [hi - lo] of positions lo..hi-1 through a block table."""
    first, last = lo // block_size, (hi - 1) // block_size
    if last >= len(table):
        raise ValueError(
            f"sequence {seq}: position {hi - 1} needs block {last} but its block table "
            f"has {len(table)} blocks of {block_size}"
        )
    blocks = table[first : last + 1]
    if FREED in blocks:
        raise ValueError(f"sequence {seq}: a position inside the attention window maps to a freed block")
    offsets = torch.arange(block_size, device=device)  # [B]
    slots = torch.tensor(blocks, dtype=torch.long, device=device)[:, None] * block_size + offsets  # [blocks, B]
    start = lo - first * block_size
    return slots.flatten()[start : start + hi - lo]


def _mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor | None:
    """[S, Tq, Tk] visibility from query positions [S, Tq] and key positions [S, Tk]; None when
    every query sees every key (a decode group with no padding), which spares SDPA the mask."""
    dist = q_pos[:, :, None] - k_pos[:, None, :]  # [S, Tq, Tk]
    visible = dist >= 0
    if window is not None:
        visible &= dist < window
    return None if bool(visible.all()) else visible
