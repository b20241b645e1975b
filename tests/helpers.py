"""Test helpers shared across modules."""

from __future__ import annotations

from typing import Any

from model import ModelConfig

# The test grid's base: tiny, but with a small vocabulary so that transformers runs fast too.
GRID_BASE = ModelConfig.preset("tiny").model_copy(update={"vocab_size": 512})


def grid_config(**update: Any) -> ModelConfig:
    return ModelConfig.model_validate(GRID_BASE.model_dump() | update)
