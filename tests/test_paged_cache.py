"""The paged cache: prefill + decode (and chunked prefill) equal a full re-forward."""

from __future__ import annotations

import pytest
import torch

from model import CacheBatch, KVCache, load_model
from model.attention_plan import plan_attention
from model.kv_cache import FREED
from tests.support.common import grid_config

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("window", [None, 6])
@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_prefill_then_decode_equals_full_forward(checkpoint_factory, window: int | None, block_size: int) -> None:
    cfg = grid_config(sliding_window=window)
    model = load_model(checkpoint_factory(cfg, seed=11))
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=gen) for n in (13, 5, 1)]
    steps = 20
    continuations = [torch.randint(0, cfg.vocab_size, (steps,), generator=gen) for _ in prompts]
    blocks = [-(-(len(p) + steps) // block_size) for p in prompts]
    cache = KVCache.allocate(cfg, sum(blocks) + 3, block_size)
    # Scattered, non-contiguous physical blocks: tables are a permutation of the pool.
    perm = torch.randperm(cache.num_blocks, generator=gen).tolist()
    tables = [perm[sum(blocks[:i]) : sum(blocks[: i + 1])] for i in range(len(prompts))]
    batch = CacheBatch(cache, tables)
    with torch.no_grad():
        lens = [len(p) for p in prompts]
        prefill = model(torch.cat(prompts), torch.cat([torch.arange(n) for n in lens]), lens, batch)
        got = [[prefill[sum(lens[: i + 1]) - 1]] for i in range(len(prompts))]
        for step in range(steps):
            tok = torch.stack([c[step] for c in continuations])
            pos = torch.tensor([n + step for n in lens])
            out = model(tok, pos, [1] * len(prompts), batch)
            for i in range(len(prompts)):
                got[i].append(out[i])
        for i, p in enumerate(prompts):
            full = torch.cat([p, continuations[i]])
            ref = model(full, torch.arange(len(full)), [len(full)])[len(p) - 1 :]
            assert (torch.stack(got[i]) - ref).abs().max().item() < 1e-5


def test_chunked_prefill_mixed_with_decode(checkpoint_factory) -> None:
    """One call carrying a prompt chunk of one sequence and a decode token of another."""
    cfg = grid_config(sliding_window=5)
    model = load_model(checkpoint_factory(cfg, seed=12))
    gen = torch.Generator().manual_seed(4)
    a = torch.randint(0, cfg.vocab_size, (17,), generator=gen)
    b = torch.randint(0, cfg.vocab_size, (9,), generator=gen)
    cache = KVCache.allocate(cfg, 12, 4)
    batch_a, batch_b = [0, 1, 2, 3, 4], [9, 8, 7]
    with torch.no_grad():
        model(b[:8], torch.arange(8), [8], CacheBatch(cache, [batch_b]))  # b prefilled
        model(a[:6], torch.arange(6), [6], CacheBatch(cache, [batch_a]))  # first chunk of a
        # Next call: a's second chunk (6 tokens) and b's decode token, packed together.
        out = model(
            torch.cat([a[6:12], b[8:9]]),
            torch.cat([torch.arange(6, 12), torch.tensor([8])]),
            [6, 1],
            CacheBatch(cache, [batch_a, batch_b]),
        )
        ref_a = model(a[:12], torch.arange(12), [12])[6:12]
        ref_b = model(b, torch.arange(9), [9])[8:9]
    assert (out - torch.cat([ref_a, ref_b])).abs().max().item() < 1e-5


def test_freed_blocks_outside_window_are_never_read(checkpoint_factory) -> None:
    """With window 4 and blocks of 2, decoding at position 12 needs only blocks 4..6."""
    cfg = grid_config(sliding_window=4)
    model = load_model(checkpoint_factory(cfg, seed=13))
    seq = torch.randint(0, cfg.vocab_size, (13,), generator=torch.Generator().manual_seed(6))
    cache = KVCache.allocate(cfg, 8, 2)
    table = list(range(7))
    with torch.no_grad():
        model(seq[:12], torch.arange(12), [12], CacheBatch(cache, [table]))
        freed = [FREED] * 4 + table[4:]
        cache.k[:, :4] = float("nan")  # garbage in freed blocks must not leak in
        cache.v[:, :4] = float("nan")
        out = model(seq[12:], torch.tensor([12]), [1], CacheBatch(cache, [freed]))
        ref = model(seq, torch.arange(13), [13])[12:]
    assert (out - ref).abs().max().item() < 1e-5
    with pytest.raises(ValueError, match="freed block"):
        plan_attention(torch.tensor([12]), [1], window=None, block_tables=[freed], block_size=2)


def test_plan_rejects_bad_layouts() -> None:
    with pytest.raises(ValueError, match="sum to 5 but 4 positions"):
        plan_attention(torch.arange(4), [2, 3], window=None)
    with pytest.raises(ValueError, match="not consecutive"):
        plan_attention(torch.tensor([0, 2]), [2], window=None)
    with pytest.raises(ValueError, match="needs block 2 but its block table has 2 blocks"):
        plan_attention(torch.tensor([8]), [1], window=None, block_tables=[[0, 1]], block_size=4)


def test_sequences_never_see_each_other(checkpoint_factory) -> None:
    cfg = grid_config()
    model = load_model(checkpoint_factory(cfg))
    gen = torch.Generator().manual_seed(8)
    a, b = torch.randint(0, 512, (6,), generator=gen), torch.randint(0, 512, (5,), generator=gen)
    b2 = torch.randint(0, 512, (5,), generator=gen)
    pos = torch.cat([torch.arange(6), torch.arange(5)])
    with torch.no_grad():
        one = model(torch.cat([a, b]), pos, [6, 5])
        two = model(torch.cat([a, b2]), pos, [6, 5])
    # Changing b moves b's logits by O(1) and a's only by GEMM rounding.
    assert (one[:6] - two[:6]).abs().max().item() < 1e-5
    assert (one[6:] - two[6:]).abs().max().item() > 0.1


def test_decode_sequences_are_grouped_by_length_with_little_padding() -> None:
    """Decode tokens of very different lengths are not all padded to the longest."""
    lengths = [40, 3, 36, 12, 10, 31]
    blocks = [list(range(i * 10, i * 10 + 10)) for i in range(len(lengths))]  # 10 blocks of 4 each
    positions = torch.tensor([n - 1 for n in lengths])
    plan = plan_attention(positions, [1] * len(lengths), None, blocks, 4)
    rows = sorted(int(r) for g in plan.groups for r in g.q_rows[:, 0])
    assert rows == list(range(len(lengths)))  # every sequence in exactly one group
    for g in plan.groups:
        keys = [lengths[int(r)] for r in g.q_rows[:, 0]]
        assert min(keys) >= 0.75 * max(keys) and g.k_index.shape[1] == max(keys)
    assert len(plan.groups) == 3  # {40, 36, 31}, {12, 10}, {3}
