"""The deployment config: which model, how it is split, how the engine and the endpoint behave.

One YAML file (e.g. `configs/tiny.yaml`) holds all of it; `build_app` derives the Serve
deployments, their placement-group bundles and the replica counts from it, and the CLI's
`plan` prints where each actor would go.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from importlib import resources
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from cluster.placement import Layout, bundles, worker_resources, worker_specs
from model.checkpoint import write_random_checkpoint
from model.config import ModelConfig

logger = logging.getLogger(__name__)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSection(_Strict):
    checkpoint: Path  # a directory in the HF or Mistral layout; relative paths are from the working directory
    name: str = "mixtral"  # the id clients pass as "model"
    preset: str | None = None  # the model's shape while the checkpoint is absent (for `plan`)
    write_if_missing: bool = False  # local mode: write a seeded random checkpoint of `preset` on first start
    seed: int = 0
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"


class ClusterSection(_Strict):
    attention_shards: int = Field(default=1, ge=1)
    routers: int = Field(default=1, ge=1)
    expert_groups: int = Field(default=1, ge=1)
    device: Literal["cpu", "cuda"] = "cpu"
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    placement_timeout_s: float = Field(default=300.0, gt=0)
    gpus_per_node: int = Field(default=8, ge=1)  # for `plan`: the GPU nodes' size
    gpu_memory_gb: float = Field(default=80.0, gt=0)  # per GPU, for the fit check
    torch_threads: int = Field(default=1, ge=1)  # per worker
    # What each worker's bundle asks for; default one GPU + one CPU on cuda, one CPU slot on cpu. Add a
    # custom resource (e.g. {"GPU": 1, "CPU": 1, "h100_node": 1}) to keep workers on one node type.
    worker_resources: dict[str, float] | None = None

    def bundle_resources(self) -> dict[str, float]:
        return dict(self.worker_resources) if self.worker_resources else worker_resources(self.device)

    @property
    def layout(self) -> Layout:
        return Layout(self.attention_shards, self.routers, self.expert_groups)


class EngineSection(_Strict):
    block_size: int = Field(default=16, ge=1)
    kv_cache_gb: float = Field(default=0.0625, gt=0)  # per attention shard
    max_batched_tokens: int = Field(default=512, ge=1)
    max_seqs: int = Field(default=64, ge=1)
    max_model_len: int | None = Field(default=None, ge=2)
    step_timeout_s: float = Field(default=300.0, gt=0)
    # Admission: the prompt + max_tokens of the requests a copy holds may add up to this many times
    # its KV capacity (the excess waits in its queue); beyond it, new requests get 429.
    kv_overcommit: float = Field(default=4.0, gt=0)


class ServingSection(_Strict):
    host: str = "127.0.0.1"  # loopback unless deliberately exposed
    http_port: int = Field(default=8000, ge=1, le=65535)
    grpc_port: int = Field(default=9000, ge=1, le=65535)
    api_key: str | None = None  # when set, every route but /health needs `Authorization: Bearer <key>`
    min_replicas: int = Field(default=1, ge=1)  # one replica = one model copy
    max_replicas: int = Field(default=1, ge=1)
    max_ongoing_requests: int = Field(default=64, ge=1)  # per model copy
    max_queued_requests: int = Field(default=256, ge=1)  # waiting for a copy; beyond it, 429 at once
    target_ongoing_requests: float = Field(default=16.0, gt=0)  # autoscaling target per copy
    max_body_bytes: int = Field(default=1 << 20, ge=1024)
    request_timeout_s: float = Field(default=600.0, gt=0)
    health_check_period_s: float = Field(default=5.0, gt=0)  # a copy whose worker died is replaced this soon
    retry_after_s: int = Field(default=10, ge=1)  # the Retry-After of 503 (copy rebuilding) and 429 answers

    @model_validator(mode="after")
    def _replicas(self) -> ServingSection:
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) must be >= min_replicas ({self.min_replicas})")
        return self


class ServeConfig(_Strict):
    model: ModelSection
    cluster: ClusterSection = ClusterSection()
    engine: EngineSection = EngineSection()
    serving: ServingSection = ServingSection()

    @classmethod
    def load(cls, path: str | Path) -> ServeConfig:
        """A config file by path, or by the name of a packaged one (`tiny.yaml`, `mixtral-8x22b.yaml`)."""
        file = Path(path)
        if not file.is_file():
            packaged = resources.files("configs").joinpath(file.name)
            if not packaged.is_file():
                raise FileNotFoundError(f"config {path} does not exist (nor is it a packaged config)")
            return cls.model_validate(yaml.safe_load(packaged.read_text()) or {})
        return cls.model_validate(yaml.safe_load(file.read_text()) or {})

    def model_shape(self) -> ModelConfig:
        """The model's shape: from the checkpoint when it exists, else from the preset."""
        if self.model.checkpoint.is_dir():
            return ModelConfig.from_checkpoint(self.model.checkpoint)
        if self.model.preset is None:
            raise FileNotFoundError(f"checkpoint {self.model.checkpoint} does not exist and no preset is given")
        return ModelConfig.preset(self.model.preset)

    def replica_bundles(self, num_experts: int) -> list[dict[str, float]]:
        """Placement-group bundles of one replica: bundle 0 for the LLMServer itself, then its workers."""
        specs = worker_specs(self.cluster.layout, num_experts)
        return bundles(specs, self.cluster.bundle_resources(), replica_bundle={"CPU": 1.0})


def ensure_checkpoint(cfg: ServeConfig, progress: bool | None = None) -> Path:
    """Local mode: write the seeded checkpoint the config names if it is missing and allowed.

    Written to a temporary sibling and renamed into place, so replicas starting together
    never see (or leave) a half-written checkpoint.
    """
    path = cfg.model.checkpoint
    if path.is_dir():
        return path
    if not (cfg.model.write_if_missing and cfg.model.preset):
        raise FileNotFoundError(
            f"checkpoint {path} does not exist; point model.checkpoint at real weights, or set "
            "model.preset and model.write_if_missing to generate a seeded random one"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        write_random_checkpoint(ModelConfig.preset(cfg.model.preset), tmp, seed=cfg.model.seed, progress=progress)
        try:
            tmp.rename(path)
        except OSError:  # another process finished first
            if not path.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("wrote a seeded %s checkpoint to %s", cfg.model.preset, path)
    return path
