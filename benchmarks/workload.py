"""The benchmark's inputs: seeded prompts of mixed lengths, and the checkpoint they run on."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from model.checkpoint import write_random_checkpoint
from model.config import ModelConfig

logger = logging.getLogger(__name__)

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
        if not path.is_dir():
            raise FileNotFoundError(f"checkpoint {path} does not exist")
        return path
    out = cache_dir / f"{preset}-seed{seed}"
    if not (out / "config.json").is_file():
        logger.info("writing a seeded %s checkpoint to %s", preset, out)
        write_random_checkpoint(ModelConfig.preset(preset), out, seed=seed, progress=True)
    return out
