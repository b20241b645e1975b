"""Paged decode attention in Triton: one query per sequence, keys and values read in place.

Shape legend: S = sequences, Hq / Hkv = query / kv heads, G = Hq / Hkv (query heads per kv
head), D = head dim, P = key slots of the pool, Tk = key slots listed per sequence.

The reference gathers every sequence's keys and values out of the pool (`k_store[k_index]`, a
copy of [S, Tk, Hkv, D] per layer) and runs SDPA on the copy. This kernel reads the pool where
it is: program (s, h) walks sequence s's `key_lens[s]` keys in blocks of BLOCK_N, finds each
one's slot through the sequence's row of `tables`, loads that row of kv head h straight from
the pool, and keeps a running softmax (max, sum and weighted values in fp32) for the G query
heads that share head h, so each key and value row is read once per step.

Key j of sequence s is at position p = first[s] + j and lies in slot
tables[s, p // B] * B + p % B: with B the cache's block size, `tables` are the block tables
(a CUDA graph's fixed-shape input); with B = 1 and first = 0, `tables` lists the slots
themselves (the planner's `k_index`). Entries past a sequence's keys are never read, so
padded tables cost nothing.

Triton is imported here only: the module is loaded by `CudaKernels` on a GPU, and by the tests
on CPU under Triton's interpreter (`TRITON_INTERPRET=1`, which must be set before anything
imports triton: tests/conftest.py does).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _decode_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    tables_ptr,
    first_ptr,
    lens_ptr,
    out_ptr,
    scale,
    stride_qs,
    stride_qh,
    stride_kp,
    stride_kh,
    stride_vp,
    stride_vh,
    stride_ts,
    stride_os,
    stride_oh,
    B: tl.constexpr,
    G: tl.constexpr,
    D: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    s = tl.program_id(0)
    kv_head = tl.program_id(1)
    g = tl.arange(0, BLOCK_G)  # [BG] query heads of this kv head (padded to BLOCK_G)
    d = tl.arange(0, BLOCK_D)  # [BD]
    g_ok = g < G
    d_ok = d < D
    heads = kv_head * G + g
    q_mask = g_ok[:, None] & d_ok[None, :]
    q = tl.load(q_ptr + s * stride_qs + heads[:, None] * stride_qh + d[None, :], mask=q_mask, other=0.0)  # [BG, BD]
    n_keys = tl.load(lens_ptr + s)
    first = tl.load(first_ptr + s)
    m = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)  # running max of the scores
    total = tl.zeros([BLOCK_G], dtype=tl.float32)  # running sum of exp(score - m)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)  # running sum of exp(score - m) * value
    for start in range(0, n_keys, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)  # [BN]
        n_ok = n < n_keys
        pos = first + n  # [BN] key positions
        blocks = tl.load(tables_ptr + s * stride_ts + pos // B, mask=n_ok, other=0)  # [BN]
        slots = blocks.to(tl.int64) * B + pos % B  # [BN] pool slots
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + slots[:, None] * stride_kp + kv_head * stride_kh + d[None, :], mask=kv_mask, other=0.0)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [BG, BN] fp32
        scores = tl.where(n_ok[None, :], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        p = tl.exp(scores - m_new[:, None])  # [BG, BN]
        alpha = tl.exp(m - m_new)  # rescales what was summed under the old max
        total = total * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr + slots[:, None] * stride_vp + kv_head * stride_vh + d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)  # [BG, BD]
        m = m_new
    out = acc / total[:, None]
    tl.store(out_ptr + s * stride_os + heads[:, None] * stride_oh + d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=q_mask)  # fmt: skip


def paged_decode_attention(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    tables: torch.Tensor,
    key_lens: torch.Tensor,
    scale: float,
    first: torch.Tensor | None = None,
    block_size: int = 1,
    block_n: int = 64,
) -> torch.Tensor:
    """q [S, Hq, D] against pools [P, Hkv, D] -> [S, Hq, D]. Sequence s sees its key_lens[s] >= 1
    keys at positions first[s] (default 0) onwards, through its row of `tables` [S, W] with
    `block_size` B (the module docstring); all on q's device."""
    s, hq, d = q.shape
    hkv = k_pool.shape[1]
    if hq % hkv:
        raise ValueError(f"{hq} query heads do not share {hkv} kv heads evenly")
    for name, t in (("q", q), ("k_pool", k_pool), ("v_pool", v_pool)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dim")
    out = torch.empty_like(q)
    if s == 0:
        return out
    group = hq // hkv
    tables = tables.contiguous()
    first = torch.zeros_like(key_lens) if first is None else first
    # tl.dot wants each side at least 16 wide; exact fp32 products where the model is fp32
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    _decode_kernel[(s, hkv)](
        q, k_pool, v_pool, tables, first, key_lens, out, scale,
        q.stride(0), q.stride(1), k_pool.stride(0), k_pool.stride(1), v_pool.stride(0), v_pool.stride(1),
        tables.stride(0), out.stride(0), out.stride(1),
        B=block_size, G=group, D=d, BLOCK_N=block_n, PRECISION=precision,
        BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_D=max(16, triton.next_power_of_2(d)),
    )  # fmt: skip
    return out
