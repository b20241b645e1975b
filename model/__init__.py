"""Pure-PyTorch Mixtral: config, layers, checkpoints, tokenizer, reference generation. No Ray here.

The same layer code runs in one process (the reference path) and inside the cluster's actors.
Each name below is imported on first use (PEP 562): a process that needs one part (the command
line's options read `model.config` alone; the workers never tokenise) does not pay for the rest.
"""

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from model.checkpoint import Checkpoint, CheckpointError, weight_names
    from model.checkpoint_writers import write_mistral_checkpoint, write_random_checkpoint
    from model.config import ModelConfig, preset_names
    from model.kv_cache import CacheBatch, KVCache
    from model.loader import load_into, load_model
    from model.mixtral import Mixtral
    from model.reference_generation import generate
    from model.sampling import DrawParams, sample
    from model.tokenizer import Tokenizer

_HOMES = {
    "CacheBatch": "model.kv_cache",
    "Checkpoint": "model.checkpoint",
    "CheckpointError": "model.checkpoint",
    "DrawParams": "model.sampling",
    "KVCache": "model.kv_cache",
    "Mixtral": "model.mixtral",
    "ModelConfig": "model.config",
    "Tokenizer": "model.tokenizer",
    "generate": "model.reference_generation",
    "load_into": "model.loader",
    "load_model": "model.loader",
    "preset_names": "model.config",
    "sample": "model.sampling",
    "weight_names": "model.checkpoint",
    "write_mistral_checkpoint": "model.checkpoint_writers",
    "write_random_checkpoint": "model.checkpoint_writers",
}
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
    if name not in _HOMES:
        raise AttributeError(f"module 'model' has no attribute {name!r}")
    return getattr(import_module(_HOMES[name]), name)
