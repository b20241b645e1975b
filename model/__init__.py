"""Pure-PyTorch Mixtral: config, layers, checkpoints, tokenizer, reference generation. No Ray here.

The same layer code runs in one process (the reference path) and inside the cluster's actors.
"""

from typing import TYPE_CHECKING, Any

from model.checkpoint import (
    Checkpoint,
    CheckpointError,
    weight_names,
    write_mistral_checkpoint,
    write_random_checkpoint,
)
from model.config import ModelConfig, preset_names
from model.generate import generate
from model.kv_cache import CacheBatch, KVCache
from model.loader import load_into, load_model
from model.mixtral import Mixtral
from model.sampling import DrawParams, sample

if TYPE_CHECKING:
    from model.tokenizer import Tokenizer

__all__ = [
    "CacheBatch",
    "Checkpoint",
    "CheckpointError",
    "DrawParams",
    "KVCache",
    "Mixtral",
    "ModelConfig",
    "Tokenizer",
    "generate",
    "load_into",
    "load_model",
    "preset_names",
    "sample",
    "weight_names",
    "write_mistral_checkpoint",
    "write_random_checkpoint",
]


def __getattr__(name: str) -> Any:
    """`Tokenizer` on first use: mistral-common costs each process ~0.4 s of CPU to import, and the
    workers, which load weights and never tokenise, import this package."""
    if name == "Tokenizer":
        from model.tokenizer import Tokenizer

        return Tokenizer
    raise AttributeError(f"module 'model' has no attribute {name!r}")
