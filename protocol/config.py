"""The config of one model copy: which model, how it is split, how the engine behaves.

`LLMConfig` is built once (from a YAML file through `cluster.serving.config.ServeConfig`, which
adds the `serving` section, or from keywords for the Python API) and handed down whole: the
engine reads `engine`, the placement `cluster`, and every worker gets the same object inside
its `WorkerSetup`. No key is copied onto another signature by hand.

    LLMConfig.from_keywords(checkpoint="ckpt/", attention_shards=2, dtype="bfloat16", kernels="torch")

Keywords are the sections' field names, which are unique across sections; an unknown one is an
error that names it.
"""

from __future__ import annotations

import logging
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from model.checkpoint_writers import write_random_checkpoint
from model.config import DTypeName, KernelChoice, ModelConfig, torch_dtype

logger = logging.getLogger(__name__)

Strategy = Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"]
Device = Literal["cpu", "cuda"]
Transport = Literal["nccl", "gloo"]


class Section(BaseModel):
    """Base of every config section: unknown keys and mutation are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSection(Section):
    checkpoint: Path  # a directory in the HF or Mistral layout; relative paths are from the working directory
    name: str = "mixtral"  # the id clients pass as "model"
    preset: str | None = None  # the model's shape while the checkpoint is absent (for `plan`)
    write_if_missing: bool = False  # local mode: write a seeded random checkpoint of `preset` on first start
    seed: int = 0  # of that checkpoint
    dtype: DTypeName = "float32"


class ClusterSection(Section):
    attention_shards: int = Field(default=1, ge=1)
    routers: int = Field(default=1, ge=1)
    expert_groups: int = Field(default=1, ge=1)
    single_process: bool = False  # the whole model in the engine's process: no Ray actors, no data plane
    device: Device = "cpu"
    placement_strategy: Strategy = "PACK"
    placement_timeout_s: float = Field(default=300.0, gt=0)
    gpus_per_node: int = Field(default=8, ge=1)  # for `plan`: the GPU nodes' size
    gpu_memory_gb: float = Field(default=80.0, gt=0)  # per GPU, for the fit check
    torch_threads: int = Field(default=1, ge=1)  # per worker
    # What each worker's bundle asks for; default one GPU + one CPU on cuda, one CPU slot on cpu. Add a
    # custom resource (e.g. {"GPU": 1, "CPU": 1, "h100_node": 1}) to keep workers on one node type.
    worker_resources: dict[str, float] | None = None
    # The data plane: nccl (one GPU per worker) or gloo (CPU; or CUDA workers sharing a GPU, through
    # host memory). Default: nccl on cuda, gloo on cpu.
    transport: Transport | None = None
    # Extra expert slots over the groups: hot experts get replicas that share their tokens. Placement
    # follows the routers' per-expert counts, at start (uniform) and at each re-placement.
    redundant_experts: int = Field(default=0, ge=0)
    rebalance_interval_s: float | None = Field(default=None, gt=0)  # re-place experts this often (None: on demand)
    # The network interface the data plane (gloo, NCCL's bootstrap) binds on every node. Default: the one
    # that carries the IP Ray knows the node by, never what the hostname resolves to (127.0.1.1 on a
    # stock Ubuntu image). Name one on machines with several NICs (EFA, bonded links), e.g. "ens5".
    network_interface: str | None = None
    # The data plane's deadline: a peer silent this long inside a step is taken as lost (a crashed or
    # partitioned host); its peers' calls fail, and the step fails over (`RayBackend`) instead of waiting
    # out engine.step_timeout_s. Raise it if one worker's part of a step can take longer (a first step
    # that compiles GPU kernels on a fresh host).
    data_plane_timeout_s: float = Field(default=10.0, gt=0)

    @model_validator(mode="after")
    def _transport_fits_device(self) -> ClusterSection:
        if self.transport == "nccl" and self.device != "cuda":
            raise ValueError("transport nccl moves GPU tensors: it needs device cuda (use gloo on cpu)")
        return self

    @property
    def data_plane(self) -> Transport:
        """The transport in use: the configured one, else the device's."""
        return self.transport or ("nccl" if self.device == "cuda" else "gloo")


class EngineSection(Section):
    block_size: int = Field(default=16, ge=1)
    kv_cache_gb: float = Field(default=0.0625, gt=0)  # GiB per attention shard
    num_blocks: int | None = Field(default=None, ge=1)  # per attention shard; overrides kv_cache_gb
    max_batched_tokens: int = Field(default=512, ge=1)
    max_seqs: int = Field(default=256, ge=1)
    max_model_len: int | None = Field(default=None, ge=2)  # default: the model's max_position_embeddings
    step_timeout_s: float = Field(default=300.0, gt=0)
    # Admission: the prompt + max_tokens of the requests a copy holds may add up to this many times
    # its KV capacity (the excess waits in its queue); beyond it, new requests get 429.
    kv_overcommit: float = Field(default=4.0, gt=0)
    kernels: KernelChoice = "auto"  # see model/kernels: auto = the CPU loops on CPU float32, torch elsewhere
    prefix_caching: bool = True  # full KV blocks keyed by their prefix, reused by later requests
    max_n: int = Field(default=16, ge=1)  # choices a request may ask for

    def context_length(self, model: ModelConfig) -> int:
        """The longest sequence (prompt + output) the engine runs: `max_model_len`, else the model's."""
        return self.max_model_len or model.max_position_embeddings


class LLMConfig(Section):
    model: ModelSection
    cluster: ClusterSection = ClusterSection()
    engine: EngineSection = EngineSection()

    @classmethod
    def from_keywords(cls, **keywords: Any) -> LLMConfig:
        """A config from flat keywords (`checkpoint=...` required), each routed to its section."""
        return cls.model_validate(_nest(cls, keywords, {}))

    def with_overrides(self, **keywords: Any) -> LLMConfig:
        """A copy with flat keywords replaced (validated like the original)."""
        return type(self).model_validate(_nest(type(self), keywords, self.model_dump()))

    @property
    def dtype(self) -> torch.dtype:
        """The torch dtype of `model.dtype`."""
        return torch_dtype(self.model.dtype)

    def model_shape(self) -> ModelConfig:
        """The model's shape: from the checkpoint when it exists, else from the preset."""
        if self.model.checkpoint.is_dir():
            return ModelConfig.from_checkpoint(self.model.checkpoint)
        if self.model.preset is None:
            raise FileNotFoundError(f"checkpoint {self.model.checkpoint} does not exist and no preset is given")
        return ModelConfig.preset(self.model.preset)

    def ensure_checkpoint(self, progress: bool | None = None) -> Path:
        """The checkpoint directory; in local mode a seeded `preset` one is written first if missing."""
        m = self.model
        return ensure_checkpoint(m.checkpoint, m.preset if m.write_if_missing else None, m.seed, progress)


def ensure_checkpoint(path: Path, preset: str | None, seed: int = 0, progress: bool | None = None) -> Path:
    """`path` if it is a checkpoint directory, else a seeded random checkpoint of `preset` written
    there. Written to a temporary sibling and renamed into place, so processes starting together
    never see (or leave) a half-written checkpoint."""
    if path.is_dir():
        return path
    if preset is None:
        raise FileNotFoundError(
            f"checkpoint {path} does not exist; point model.checkpoint at real weights, or set "
            "model.preset and model.write_if_missing to generate a seeded random one"
        )
    logger.info("writing a seeded %r checkpoint to %s (first run only)", preset, path)
    if progress:  # a command's first run: say what the progress bar is for
        print(f"writing a seeded {preset!r} checkpoint to {path} (first run only)", file=sys.stderr)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        write_random_checkpoint(ModelConfig.preset(preset), tmp, seed=seed, progress=progress)
        try:
            tmp.rename(path)
        except OSError:  # another process finished first
            if not path.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def section_of(cls: type[BaseModel]) -> dict[str, str]:
    """Flat key -> the section that holds it, over every section of `cls`."""
    out: dict[str, str] = {}
    for section, info in cls.model_fields.items():
        sub = info.annotation
        assert isinstance(sub, type) and issubclass(sub, BaseModel), f"{section} is not a config section"
        for key in sub.model_fields:
            assert key not in out, f"config key {key} is in both {out[key]} and {section}"
            out[key] = section
    return out


def _nest(cls: type[BaseModel], flat: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    where = section_of(cls)
    unknown = sorted(set(flat) - set(where))
    if unknown:
        raise TypeError(f"unknown config keys {', '.join(unknown)}; known: {', '.join(sorted(where))}")
    nested: dict[str, Any] = {section: dict(base.get(section, {})) for section in cls.model_fields}
    for key, value in flat.items():
        nested[where[key]][key] = value
    return nested
