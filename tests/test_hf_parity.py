"""Logits and greedy generation equal transformers' MixtralForCausalLM on the same checkpoint."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from transformers import MixtralForCausalLM

from model import DrawParams, generate, load_model
from tests.support.common import grid_config

pytestmark = pytest.mark.unit

LENGTHS = [9, 1, 23, 16]  # packed batch of unequal sequences; 23 > every small window below


def hf_logits(hf: MixtralForCausalLM, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return hf(tokens[None]).logits[0]


GRID = [
    dict(num_kv_heads=kv, experts_per_token=k, num_experts=e, sliding_window=w)
    for kv, k, e, w in itertools.product([4, 2, 1], [1, 2], [4, 8], [None, 6])
]  # kv-head ratio num_heads / num_kv_heads = 1, 2, 4


@pytest.mark.parametrize("update", GRID, ids=lambda u: "-".join(f"{k[:6]}{v}" for k, v in u.items()))
def test_packed_logits_equal_transformers(checkpoint_factory, update: dict) -> None:
    cfg = grid_config(**update)
    path: Path = checkpoint_factory(cfg, seed=sum(v or 0 for v in update.values()))
    ours = load_model(path)
    hf = MixtralForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, cfg.vocab_size, (n,), generator=gen) for n in LENGTHS]
    tokens = torch.cat(seqs)
    positions = torch.cat([torch.arange(n) for n in LENGTHS])
    with torch.no_grad():
        packed = ours(tokens, positions, LENGTHS)
    assert packed.shape == (sum(LENGTHS), cfg.vocab_size)
    expected = torch.cat([hf_logits(hf, s) for s in seqs])
    assert (packed - expected).abs().max().item() < 1e-4
    assert expected.std() > 0.1  # the comparison is not between two near-zero tensors


def test_bf16_logits_close_to_transformers(checkpoint_factory) -> None:
    path = checkpoint_factory(grid_config(sliding_window=6))
    ours = load_model(path, dtype=torch.bfloat16)
    hf = MixtralForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    assert ours.layers[0].block_sparse_moe.experts.w1.dtype == torch.bfloat16
    tokens = torch.randint(0, 512, (20,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours_logits = ours(tokens, torch.arange(20), [20]).float()
    ref = hf_logits(hf, tokens).float()
    # bf16 has 8 bits of mantissa: compare relative to the logits' scale, and the argmax.
    assert (ours_logits - ref).abs().max() < 0.05 * ref.abs().max()
    assert (ours_logits.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9


@pytest.mark.parametrize("window", [None, 5])
def test_greedy_generation_equals_transformers_generate(checkpoint_factory, window: int | None) -> None:
    cfg = grid_config(sliding_window=window)
    path = checkpoint_factory(cfg, seed=7)
    ours = load_model(path)
    hf = MixtralForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, cfg.vocab_size, (n,), generator=gen).tolist() for n in (11, 2, 7)]
    outs = generate(ours, prompts, DrawParams(temperature=0.0), max_tokens=32, eos_id=None)
    for prompt, out in zip(prompts, outs, strict=True):
        ref = hf.generate(
            torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=0
        )[0, len(prompt) :].tolist()
        assert out == ref
        assert len(set(out)) > 4  # a varied continuation, not one token repeated
