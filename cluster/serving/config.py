"""The deployment config: which model, how it is split, how the engine and the endpoint behave.

One YAML file (e.g. `configs/tiny.yaml`) holds all of it: the `LLMConfig` sections (`model`,
`cluster`, `engine`; see `protocol/config.py`) and `serving`. `build_app` derives the Serve
deployments, their placement-group bundles and the replica counts from it; the model copy gets
the config whole (`LLM(config)`), and the CLI's `plan` prints where each actor would go.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import yaml
from pydantic import Field, model_validator

from cluster.backend.placement import Layout, bundles, worker_resources, worker_specs
from protocol.config import LLMConfig, Section


class ServingSection(Section):
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


class ServeConfig(LLMConfig):
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

    def replica_bundles(self, num_experts: int) -> list[dict[str, float]]:
        """Placement-group bundles of one replica: bundle 0 for the LLMServer itself, then its workers
        (a single-process copy computes in the replica, so its one bundle holds the worker's resources)."""
        if self.cluster.single_process:
            return [worker_resources(self.cluster)]
        specs = worker_specs(Layout.of(self.cluster), num_experts)
        return bundles(specs, worker_resources(self.cluster), replica_bundle={"CPU": 1.0})
