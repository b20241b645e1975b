"""The benchmark's inputs: seeded prompts of mixed lengths, and the checkpoint they run on."""

from __future__ import annotations

from pathlib import Path

import torch

from protocol import config as protocol_config

FIRST_ORDINARY_TOKEN = 3  # 0..2 are <unk>, <s>, </s> in the Mistral vocabularies


def mixed_prompts(n: int, min_len: int, max_len: int, vocab_size: int, seed: int = 0) -> list[list[int]]:
    """`n` prompts of random ordinary tokens whose lengths spread evenly over [min_len, max_len], shuffled."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.linspace(min_len, max_len, n).round().long()
    lengths = lengths[torch.randperm(n, generator=g)]
    vocab = min(vocab_size, 32768)
    return [
        [1] + torch.randint(FIRST_ORDINARY_TOKEN, vocab, (int(length) - 1,), generator=g).tolist() for length in lengths
    ]


def ensure_checkpoint(path: Path | None, preset: str, cache_dir: Path, seed: int = 0) -> Path:
    """The checkpoint to run: `path` as given, else a seeded `preset` written once under `cache_dir`."""
    if path is not None:
        return protocol_config.ensure_checkpoint(path, None)
    return protocol_config.ensure_checkpoint(cache_dir / f"{preset}-seed{seed}", preset, seed, progress=True)
