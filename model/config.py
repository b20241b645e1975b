"""Model configuration: one frozen, validated description of a Mixtral-style model.

A `ModelConfig` is read from a checkpoint's own `config.json` (Hugging Face) or `params.json`
(Mistral consolidated), or from a named preset in `configs/models/<name>.yaml`. Field names are
ours; the readers below map the two on-disk vocabularies onto them.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

Part = Literal["embed", "attention", "gate", "experts", "head"]
# What each worker role holds: attention shards embed/attention/head, routers gates, expert groups experts.
ALL_PARTS: frozenset[Part] = frozenset(("embed", "attention", "gate", "experts", "head"))

if TYPE_CHECKING:
    import torch

DTypeName = Literal["float32", "bfloat16", "float16"]
DTYPE_NAMES: tuple[DTypeName, ...] = ("float32", "bfloat16", "float16")
# The engine's kernels (`model.kernels.select_kernels`): named here so that options and configs
# can list them without importing torch.
KernelChoice = Literal["auto", "torch", "cpu", "cuda"]
KERNEL_CHOICES: tuple[KernelChoice, ...] = ("auto", "torch", "cpu", "cuda")


def torch_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """The torch dtype of a config's dtype name (or the dtype itself)."""
    import torch  # here, not at the top: the command line's options read this module

    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPE_NAMES)}, got {dtype!r}")
    return getattr(torch, dtype)


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
        rope_type = rope.get("rope_type", "default")
        if rope_type != "default":
            raise ValueError(f"rope_parameters.rope_type {rope_type!r} is not supported (only 'default')")
        if "rope_theta" not in d and "rope_theta" in rope:  # newer transformers nest it
            d = d | {"rope_theta": rope["rope_theta"]}
        return cls._from_keys(d, HF, "config.json")

    @classmethod
    def from_mistral_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """From a Mistral consolidated `params.json` (mistral-inference ModelArgs keys)."""
        if not d.get("moe"):
            raise ValueError("params.json has no 'moe' section: this is a dense model, not a Mixtral")
        return cls._from_keys(d, MISTRAL, "params.json")

    @classmethod
    def _from_keys(cls, d: dict[str, Any], vocabulary: int, where: str) -> ModelConfig:
        values: dict[str, Any] = {}
        for field, keys in _KEYS.items():
            value = _lookup(d, keys[vocabulary])
            if value is not None:
                values[field] = value
            elif field not in _OPTIONAL:
                raise ValueError(f"{where} has no {keys[vocabulary]!r} (is it a Mixtral config?)")
        values.setdefault("num_kv_heads", values["num_heads"])  # no key: plain multi-head attention
        values.setdefault("head_dim", values["hidden_size"] // values["num_heads"])
        return cls(**values)

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
        mapped = {keys[HF]: getattr(self, field) for field, keys in _KEYS.items()}
        return (
            {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral"}
            | mapped
            | {
                "hidden_act": "silu",
                "tie_word_embeddings": False,
                "bos_token_id": 1,
                "eos_token_id": 2,
            }
        )

    def to_mistral_dict(self) -> dict[str, Any]:
        """The `params.json` of the Mistral consolidated layout."""
        out: dict[str, Any] = {}
        for field, keys in _KEYS.items():
            *parents, leaf = keys[MISTRAL].split(".")
            target = out
            for parent in parents:
                target = target.setdefault(parent, {})
            target[leaf] = getattr(self, field)
        return out


# Our field -> its key in a Hugging Face `config.json` and in a Mistral `params.json` ("moe.x" is
# nested). Read in this order, so the head count and width are known when their dependents default.
HF, MISTRAL = 0, 1
_KEYS: dict[str, tuple[str, str]] = {
    "num_heads": ("num_attention_heads", "n_heads"),
    "hidden_size": ("hidden_size", "dim"),
    "num_layers": ("num_hidden_layers", "n_layers"),
    "num_kv_heads": ("num_key_value_heads", "n_kv_heads"),
    "head_dim": ("head_dim", "head_dim"),
    "intermediate_size": ("intermediate_size", "hidden_dim"),
    "vocab_size": ("vocab_size", "vocab_size"),
    "num_experts": ("num_local_experts", "moe.num_experts"),
    "experts_per_token": ("num_experts_per_tok", "moe.num_experts_per_tok"),
    "rope_theta": ("rope_theta", "rope_theta"),
    "norm_eps": ("rms_norm_eps", "norm_eps"),
    "max_position_embeddings": ("max_position_embeddings", "max_seq_len"),
    "sliding_window": ("sliding_window", "sliding_window"),
}
_OPTIONAL = {"num_kv_heads", "head_dim", "rope_theta", "norm_eps", "max_position_embeddings", "sliding_window"}


def _lookup(d: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(d, dict):
            return None
        d = d.get(part)  # type: ignore[assignment]
    return d


def preset_names() -> list[str]:
    """Names of the presets shipped in `configs/models/`."""
    folder = resources.files("configs").joinpath("models")
    return sorted(p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml"))
