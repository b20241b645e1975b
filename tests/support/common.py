"""Test helpers shared across modules."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import ray
import torch

from model import DrawParams, ModelConfig, generate, load_model

# The test grid's base: tiny, but with a small vocabulary so that transformers runs fast too.
GRID_BASE = ModelConfig.preset("tiny").model_copy(update={"vocab_size": 512})


# The engine tests' model: the real vocabulary (text round-trips) and a window shorter than
# most prompts, so window-freed blocks and cache reads across blocks are always exercised.
ENGINE_CONFIG = ModelConfig.preset("tiny").model_copy(update={"sliding_window": 12})


README = Path(__file__).resolve().parents[2] / "README.md"


def readme_blocks(heading: str, language: str = "python") -> list[str]:
    """The README's code blocks in `language` under the section `## heading` (up to the next `## `)."""
    text = README.read_text()
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    section = text[start : end if end != -1 else len(text)]
    return re.findall(rf"^```{language}\n(.*?)^```$", section, flags=re.MULTILINE | re.DOTALL)


def local_ray() -> None:
    """This process's local Ray (32 logical CPUs: several copies may be alive at once), started if
    none is connected and left up for the modules after, each of which would otherwise pay ~6 s to
    start and stop its own; it ends with the session. A module that needs a cluster of its own
    (`ray.cluster_utils.Cluster`) calls `ray.shutdown()` first."""
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=32, include_dashboard=False)


def run_example(code: str, cwd: Path, timeout_s: float = 240) -> str:
    """Run `code` as a script in `cwd`, with this checkout importable; its stdout."""
    env = os.environ | {"PYTHONPATH": str(README.parent)}
    r = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                       timeout=timeout_s)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def grid_config(**update: Any) -> ModelConfig:
    return ModelConfig.model_validate(GRID_BASE.model_dump() | update)


def reference_greedy(path: Path, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """Greedy continuations from the one-process reference generator (no eos stop)."""
    model = load_model(path)
    return generate(model, prompts, DrawParams(temperature=0.0), max_tokens=max_tokens, eos_id=None)


def random_prompts(n: int, seed: int, low: int = 1, high: int = 40, vocab: int = 32768) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high + 1, (n,), generator=gen).tolist()
    return [[1, *torch.randint(3, vocab, (length - 1,), generator=gen).tolist()] for length in lengths]


def staggered_streams(llm: Any, prompts: list[list[int]], params: Any) -> list[tuple[list[int], str, str]]:
    """Stream prompts[0]; the others join once it has decoded 3 tokens. Per prompt: the streamed
    token ids, the concatenated text deltas, and the final text."""

    async def run() -> list[tuple[list[int], str, str]]:
        started = asyncio.Event()

        async def one(p: list[int], wait: bool) -> tuple[list[int], str, str]:
            if wait:
                await started.wait()
            tokens: list[int] = []
            text = ""
            final = None
            async for out in llm.stream(p, params):
                tokens += out.new_token_ids
                text += out.new_text
                if len(tokens) >= 3:
                    started.set()
                final = out
            assert final is not None and final.finished
            return tokens, text, final.text

        return list(await asyncio.gather(*(one(p, i > 0) for i, p in enumerate(prompts))))

    return asyncio.run(run())


def poisoned_copy(src: Path, dst: Path, token: int) -> Path:
    """A copy of checkpoint `src` whose embedding row `token` is NaN: what broken weights look like.
    A sequence holding that token gets NaN logits; the others are untouched."""
    import shutil

    from safetensors.torch import load_file, save_file

    dst.mkdir(parents=True, exist_ok=True)
    for f in Path(src).iterdir():
        shutil.copy(f, dst / f.name)
    tensors = load_file(dst / "model.safetensors")
    tensors["model.embed_tokens.weight"][token] = float("nan")
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def idle(stats: dict[str, Any]) -> dict[str, Any]:
    """The part of `LLM.stats()` that says nothing runs, waits or holds KV blocks."""
    return {k: stats[k] for k in ("running", "waiting", "blocks_in_use")}
