"""Grouped-query attention over packed sequences, with an optional paged KV cache.

Shape legend: T = packed tokens of the call, H = hidden, Hq / Hkv = query / kv heads,
D = head dim, S = sequences in one attention group, Tq / Tk = queries / keys per sequence
(padded within a group), N*B = slots of the paged pool.

Several sequences are packed flat (`seq_lens` tokens each). Query i of a sequence may see key j
of the same sequence when `pos_j <= pos_i` and, with a sliding window W, `pos_i - W < pos_j`.
Sequences never see each other. `plan_attention` turns positions, lengths and block tables
into index tensors once per forward; every layer reuses that plan.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from model import cpu_kernels
from model.config import ModelConfig
from model.kv_cache import FREED
from model.linear import Linear, linear_cat
from model.rope import apply_rotary

_FUTURE = 2**62  # key position given to padding: later than any query


@dataclass
class AttentionGroup:
    """Sequences attended by one SDPA call, padded to common query and key counts."""

    q_rows: torch.Tensor  # [S, Tq] rows of the packed tokens
    k_index: torch.Tensor  # [S, Tk] rows of the key store: the call's own keys, or pool slots with a cache
    mask: torch.Tensor | None  # [S, Tq, Tk] bool, True where the query sees the key; None: sees all
    key_lens: torch.Tensor | None = None  # [S] one-query groups: each query sees its first key_lens keys


@dataclass
class AttentionPlan:
    groups: list[AttentionGroup]
    write_slots: torch.Tensor | None  # [T] pool slot of each new token; None without a cache


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
            lo = 0 if window is None else max(0, first - window + 1)
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


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        h, d = config.hidden_size, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, d
        self.q_proj = Linear(h, config.num_heads * d)
        self.k_proj = Linear(h, config.num_kv_heads * d)
        self.v_proj = Linear(h, config.num_kv_heads * d)
        self.o_proj = Linear(config.num_heads * d, h)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        plan: AttentionPlan,
        kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """x [T, H] -> [T, H]; `kv` is this layer's flat pools [N*B, Hkv, D] when a cache is used."""
        t, d, hq, hkv = x.shape[0], self.head_dim, self.num_heads, self.num_kv_heads
        qkv = linear_cat(x, (self.q_proj.weight, self.k_proj.weight, self.v_proj.weight))  # [T, (Hq + 2 Hkv) D]
        qkv = qkv.view(t, hq + 2 * hkv, d)
        qk = apply_rotary(qkv[:, : hq + hkv], cos, sin)  # [T, Hq + Hkv, D]: queries and keys rotate alike
        q, k, v = qk[:, :hq], qk[:, hq:], qkv[:, hq + hkv :]  # [T, Hq, D], [T, Hkv, D], [T, Hkv, D]
        if kv is None:
            k_store, v_store = k, v
        else:
            assert plan.write_slots is not None, "a cache needs a plan made with block tables"
            k_store, v_store = kv
            k_store[plan.write_slots] = k
            v_store[plan.write_slots] = v
        out = torch.empty_like(q)  # [T, Hq, D]
        one_query = any(g.key_lens is not None for g in plan.groups)
        kernels = cpu_kernels.load() if one_query and cpu_kernels.usable(q, k_store) else None
        if kernels is not None:  # [P, Hkv, D] each (without a cache: this call's keys)
            k_pool, v_pool = k_store.contiguous(), v_store.contiguous()
        for g in plan.groups:
            if kernels is not None and g.key_lens is not None:  # one query per sequence: read the pool in place
                rows = g.q_rows[:, 0]  # [S]
                out[rows] = kernels.decode_attention(q[rows], k_pool, v_pool, g.k_index, g.key_lens, d**-0.5)
                continue
            qg = q[g.q_rows].transpose(1, 2)  # [S, Tq, Hq, D] -> [S, Hq, Tq, D]
            kg = k_store[g.k_index].transpose(1, 2)  # [S, Tk, Hkv, D] -> [S, Hkv, Tk, D]
            vg = v_store[g.k_index].transpose(1, 2)  # [S, Tk, Hkv, D] -> [S, Hkv, Tk, D]
            mask = None if g.mask is None else g.mask[:, None]  # [S, 1, Tq, Tk]
            og = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=mask, scale=d**-0.5, enable_gqa=True)
            # og [S, Hq, Tq, D]
            out[g.q_rows] = og.transpose(1, 2)  # [S, Tq, Hq, D]
        return self.o_proj(out.view(t, self.num_heads * d))
