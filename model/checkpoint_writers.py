"""Checkpoint writers: a seeded random checkpoint of any shape in the Hugging Face layout (what
`mixtral-cluster make-tiny`, the tests and the benchmarks run on, since nothing here downloads
weights; `MixtralForCausalLM` loads it too), and a checkpoint rewritten in the Mistral consolidated
layout. Reading is `model.checkpoint`'s.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from model.checkpoint import (
    PROGRESS_BYTES,
    Checkpoint,
    expected_shape,
    hf_to_mistral,
    permute_rotary_rows,
    weight_names,
)
from model.config import ModelConfig

logger = logging.getLogger(__name__)


def _random_tensor(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    if len(shape) == 1:  # norms: near 1, not exactly, so a misplaced norm shows in the logits
        return 1.0 + 0.1 * torch.randn(shape, generator=gen)
    if name.endswith("embed_tokens.weight"):
        return torch.randn(shape, generator=gen)
    return torch.randn(shape, generator=gen) * shape[1] ** -0.5  # unit-variance activations


def write_random_checkpoint(
    config: ModelConfig,
    path: str | Path,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    max_shard_bytes: int = 2 << 30,
    progress: bool | None = None,
) -> Path:
    """Write a seeded random checkpoint in the HF layout that `MixtralForCausalLM` also loads.

    Above `max_shard_bytes` the tensors are split over `model-0000i-of-0000n.safetensors` files
    with a `model.safetensors.index.json`. Tensors are generated shard by shard, so memory stays
    within one shard.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    names = weight_names(config)
    itemsize = torch.empty((), dtype=dtype).element_size()
    sizes = [math.prod(expected_shape(config, n)) * itemsize for n in names]
    shards: list[list[str]] = [[]]
    used = 0
    for name, size in zip(names, sizes, strict=True):
        if shards[-1] and used + size > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += size
    gen = torch.Generator().manual_seed(seed)
    files = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    show = progress if progress is not None else sum(sizes) > PROGRESS_BYTES
    with tqdm(total=sum(sizes), unit="B", unit_scale=True, desc=f"writing {path.name}", disable=not show) as bar:
        for fname, shard in zip(files, shards, strict=True):
            tensors = {}
            for name in shard:
                tensors[name] = _random_tensor(name, expected_shape(config, name), gen).to(dtype).contiguous()
                bar.update(tensors[name].numel() * itemsize)
            save_file(tensors, str(path / fname), metadata={"format": "pt"})
    if len(shards) > 1:
        weight_map = {n: f for f, shard in zip(files, shards, strict=True) for n in shard}
        index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
        (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    hf = config.to_hf_dict() | {"torch_dtype": str(dtype).removeprefix("torch.")}
    (path / "config.json").write_text(json.dumps(hf, indent=2))
    logger.info("wrote a %s checkpoint (%d tensors, seed %d) to %s", config.num_parameters, len(names), seed, path)
    return path


def write_mistral_checkpoint(source: Checkpoint, path: str | Path) -> Path:
    """Rewrite a checkpoint in the Mistral consolidated layout (`consolidated.safetensors` + `params.json`)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = source.config
    tensors = {}
    for name, tensor in source.read(sorted(source.names)):
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = cfg.num_heads if "q_proj" in name else cfg.num_kv_heads
            tensor = permute_rotary_rows(tensor, heads, to_hf=False)
        tensors[hf_to_mistral(name)] = tensor.contiguous()
    save_file(tensors, str(path / "consolidated.safetensors"))
    (path / "params.json").write_text(json.dumps(cfg.to_mistral_dict(), indent=2))
    return path
