"""Model configuration: one frozen, validated description of a Mixtral-style model.

A `ModelConfig` is read from a checkpoint's own `config.json` (Hugging Face) or `params.json`
(Mistral consolidated), or from a named preset in `configs/models/<name>.yaml`. Field names are
ours; the readers below map the two on-disk vocabularies onto them.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

Part = Literal["embed", "attention", "gate", "experts", "head"]
# What each worker role holds: attention shards embed/attention/head, routers gates, expert groups experts.
ALL_PARTS: frozenset[Part] = frozenset(("embed", "attention", "gate", "experts", "head"))

DTypeName = Literal["float32", "bfloat16", "float16"]
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """The torch dtype of a config's dtype name (or the dtype itself)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


class ModelConfig(BaseModel):
    """Shape and numerics of a Mixtral-style sparse MoE decoder."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    hidden_size: int = Field(gt=0)
    num_layers: int = Field(gt=0)
    num_heads: int = Field(gt=0)
    num_kv_heads: int = Field(gt=0)  # grouped-query attention: num_heads // num_kv_heads queries share a key
    head_dim: int = Field(gt=0)  # explicit: Mixtral's is hidden_size // num_heads, other models differ
    intermediate_size: int = Field(gt=0)  # per expert
    vocab_size: int = Field(gt=0)
    num_experts: int = Field(gt=0)
    experts_per_token: int = Field(gt=0)  # top-k of the router
    rope_theta: float = Field(default=1e6, gt=0)
    norm_eps: float = Field(default=1e-5, gt=0)
    max_position_embeddings: int = Field(default=32768, gt=0)
    sliding_window: int | None = Field(default=None, gt=0)  # None = full causal attention

    @model_validator(mode="after")
    def _check_consistency(self) -> ModelConfig:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be divisible by num_kv_heads ({self.num_kv_heads})")
        if self.experts_per_token > self.num_experts:
            raise ValueError(
                f"experts_per_token ({self.experts_per_token}) must be <= num_experts ({self.num_experts})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim ({self.head_dim}) must be even for rotary embeddings")
        return self

    @property
    def num_parameters(self) -> int:
        """Total parameter count (all experts)."""
        h, i, e = self.hidden_size, self.intermediate_size, self.num_experts
        attn = h * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
        per_layer = attn + e * 3 * h * i + e * h + 2 * h
        return self.num_layers * per_layer + 2 * self.vocab_size * h + h

    # ---- readers -------------------------------------------------------------------------------

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """From a Hugging Face `config.json` (MixtralConfig keys)."""
        rope = d.get("rope_parameters") or {}
        theta = d.get("rope_theta", rope.get("rope_theta", 1e6))
        rope_type = rope.get("rope_type", "default")
        if rope_type != "default":
            raise ValueError(f"rope_parameters.rope_type {rope_type!r} is not supported (only 'default')")
        heads = _require(d, "num_attention_heads", "config.json")
        hidden = _require(d, "hidden_size", "config.json")
        return cls(
            hidden_size=hidden,
            num_layers=_require(d, "num_hidden_layers", "config.json"),
            num_heads=heads,
            num_kv_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or hidden // heads,
            intermediate_size=_require(d, "intermediate_size", "config.json"),
            vocab_size=_require(d, "vocab_size", "config.json"),
            num_experts=_require(d, "num_local_experts", "config.json"),
            experts_per_token=_require(d, "num_experts_per_tok", "config.json"),
            rope_theta=theta,
            norm_eps=d.get("rms_norm_eps", 1e-5),
            max_position_embeddings=d.get("max_position_embeddings", 32768),
            sliding_window=d.get("sliding_window"),
        )

    @classmethod
    def from_mistral_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """From a Mistral consolidated `params.json` (mistral-inference ModelArgs keys)."""
        moe = d.get("moe")
        if not moe:
            raise ValueError("params.json has no 'moe' section: this is a dense model, not a Mixtral")
        heads = _require(d, "n_heads", "params.json")
        dim = _require(d, "dim", "params.json")
        return cls(
            hidden_size=dim,
            num_layers=_require(d, "n_layers", "params.json"),
            num_heads=heads,
            num_kv_heads=d.get("n_kv_heads") or heads,
            head_dim=d.get("head_dim") or dim // heads,
            intermediate_size=_require(d, "hidden_dim", "params.json"),
            vocab_size=_require(d, "vocab_size", "params.json"),
            num_experts=_require(moe, "num_experts", "params.json moe"),
            experts_per_token=_require(moe, "num_experts_per_tok", "params.json moe"),
            rope_theta=d.get("rope_theta", 1e6),
            norm_eps=d.get("norm_eps", 1e-5),
            max_position_embeddings=d.get("max_seq_len", 32768),
            sliding_window=d.get("sliding_window"),
        )

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> ModelConfig:
        """Read `config.json` (preferred) or `params.json` from a checkpoint directory."""
        path = Path(path)
        if (path / "config.json").is_file():
            return cls.from_hf_dict(json.loads((path / "config.json").read_text()))
        if (path / "params.json").is_file():
            return cls.from_mistral_dict(json.loads((path / "params.json").read_text()))
        raise FileNotFoundError(
            f"checkpoint {path} has neither config.json (Hugging Face layout) nor params.json (Mistral layout)"
        )

    @classmethod
    def preset(cls, name: str) -> ModelConfig:
        """A named preset from `configs/models/<name>.yaml` (exact name only)."""
        names = preset_names()
        if name not in names:
            raise ValueError(f"unknown model preset {name!r}; known presets: {', '.join(names)}")
        text = resources.files("configs").joinpath("models").joinpath(f"{name}.yaml").read_text()
        return cls.model_validate(yaml.safe_load(text))

    def to_hf_dict(self) -> dict[str, Any]:
        """The `config.json` that transformers' MixtralConfig reads."""
        return {
            "architectures": ["MixtralForCausalLM"],
            "model_type": "mixtral",
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.intermediate_size,
            "vocab_size": self.vocab_size,
            "num_local_experts": self.num_experts,
            "num_experts_per_tok": self.experts_per_token,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "sliding_window": self.sliding_window,
            "hidden_act": "silu",
            "tie_word_embeddings": False,
            "bos_token_id": 1,
            "eos_token_id": 2,
        }

    def to_mistral_dict(self) -> dict[str, Any]:
        """The `params.json` of the Mistral consolidated layout."""
        return {
            "dim": self.hidden_size,
            "n_layers": self.num_layers,
            "n_heads": self.num_heads,
            "n_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_dim": self.intermediate_size,
            "vocab_size": self.vocab_size,
            "norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "max_seq_len": self.max_position_embeddings,
            "sliding_window": self.sliding_window,
            "moe": {"num_experts": self.num_experts, "num_experts_per_tok": self.experts_per_token},
        }


def preset_names() -> list[str]:
    """Names of the presets shipped in `configs/models/`."""
    folder = resources.files("configs").joinpath("models")
    return sorted(p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml"))


def _require(d: dict[str, Any], key: str, where: str) -> Any:
    if key not in d or d[key] is None:
        raise ValueError(f"{where} has no {key!r} (is it a Mixtral config?)")
    return d[key]
