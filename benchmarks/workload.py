"""The benchmark's inputs: seeded prompts of mixed lengths, and the checkpoint they run on."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

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


def skewed_copy(src: Path, dst: Path, hot: tuple[int, ...] = (6, 7), strength: float = 2.0) -> Path:
    """A copy of checkpoint `src` whose gates send most tokens of most layers to the `hot` experts:
    every token's embedding gets one shared direction, and the hot experts' gate rows of every layer
    align with it (the residual stream carries it through the layers). Real traffic is skewed like
    this: a few experts of some layers get most of the tokens."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in Path(src).iterdir():
        shutil.copy(f, dst / f.name)
    tensors = load_file(dst / "model.safetensors")
    embed = tensors["model.embed_tokens.weight"]  # [V, H]
    direction = torch.randn(embed.shape[1], generator=torch.Generator().manual_seed(17))
    direction /= direction.norm()
    embed += strength * direction
    for name, tensor in tensors.items():
        if name.endswith("block_sparse_moe.gate.weight"):  # [E, H]
            tensor[list(hot)] += strength * direction
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst
