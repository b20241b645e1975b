"""Deployment files: `ray_cluster.yaml` and the Serve configs against Ray's own schemas, our
configs against ours, and the gRPC stubs against the proto they are generated from."""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.serve.schema import ServeDeploySchema

from cluster.serving.config import ServeConfig

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
SERVE_CONFIGS = sorted(ROOT.glob("configs/serve-*.yaml"))
MODEL_CONFIGS = sorted(p for p in ROOT.glob("configs/*.yaml") if not p.name.startswith("serve-"))


def test_ray_cluster_yaml_validates_against_rays_schema() -> None:
    cfg = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())
    validate_config(prepare_config(copy.deepcopy(cfg)))
    gpu = [t for t in cfg["available_node_types"].values() if t["resources"].get("GPU", 0) >= 8]
    assert gpu and gpu[0]["max_workers"] >= 2, "room for two 8-GPU nodes"
    assert cfg["available_node_types"][cfg["head_node_type"]]["resources"].get("GPU", 0) == 0
    assert any("pip install" in c and "mixtral-cluster" in c for c in cfg["setup_commands"])
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert any("--metrics-export-port" in c for c in cfg[key]), key
    assert any("--dashboard-host=127.0.0.1" in c for c in cfg["head_start_ray_commands"])


def test_a_broken_cluster_yaml_is_refused_by_the_same_check() -> None:
    cfg = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())
    cfg["available_node_types"]["head"]["node_config"] = "m5.large"  # must be a mapping
    with pytest.raises(Exception, match="node_config"):
        validate_config(prepare_config(cfg))


@pytest.mark.parametrize("path", SERVE_CONFIGS, ids=lambda p: p.name)
def test_serve_configs_validate_and_name_a_loadable_app_config(path: Path) -> None:
    raw = yaml.safe_load(path.read_text())
    schema = ServeDeploySchema.model_validate(raw)
    assert schema.grpc_options.grpc_servicer_functions == [
        "cluster.proto.inference_pb2_grpc.add_InferenceServicer_to_server"
    ]
    (app,) = schema.applications
    assert app.import_path == "cluster.serving.app:app_builder"
    cfg = ServeConfig.load(app.args["config"])  # a packaged config name
    assert cfg.serving.http_port == schema.http_options.port
    assert cfg.serving.grpc_port == schema.grpc_options.port


@pytest.mark.parametrize("path", MODEL_CONFIGS, ids=lambda p: p.name)
def test_model_configs_load(path: Path) -> None:
    cfg = ServeConfig.load(path)
    bundles = cfg.replica_bundles(cfg.model_shape().num_experts)
    assert bundles[0] == {"CPU": 1.0}  # bundle 0: the LLMServer replica itself
    assert len(bundles) == 1 + cfg.cluster.attention_shards + cfg.cluster.routers + cfg.cluster.expert_groups


def test_8x22b_config_is_the_documented_layout() -> None:
    cfg = ServeConfig.load("mixtral-8x22b.yaml")
    clu = cfg.cluster
    assert (clu.attention_shards, clu.routers, clu.expert_groups) == (2, 1, 8)
    assert (clu.device, cfg.model.dtype, clu.gpus_per_node) == ("cuda", "bfloat16", 8)
    bundles = cfg.replica_bundles(8)
    assert all(b == {"GPU": 1.0, "CPU": 1.0} for b in bundles[1:])


def test_config_errors_name_the_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {checkpoint: x}\ncluster: {expert_groups: 0}\n")
    with pytest.raises(ValueError, match="expert_groups"):
        ServeConfig.load(bad)
    bad.write_text("model: {checkpoint: x}\nserving: {http_prot: 1}\n")
    with pytest.raises(ValueError, match="http_prot"):
        ServeConfig.load(bad)
    with pytest.raises(FileNotFoundError, match=r"nope\.yaml"):
        ServeConfig.load(tmp_path / "nope.yaml")


def test_grpc_stubs_are_generated_from_the_proto(tmp_path: Path) -> None:
    """Regenerate the stubs from cluster/proto/inference.proto and compare with the committed ones."""
    (tmp_path / "cluster" / "proto").mkdir(parents=True)
    shutil.copy(ROOT / "cluster/proto/inference.proto", tmp_path / "cluster/proto/inference.proto")
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I.", "--python_out=.", "--grpc_python_out=.",
         "cluster/proto/inference.proto"],
        cwd=tmp_path, check=True,
    )  # fmt: skip
    for name in ("inference_pb2.py", "inference_pb2_grpc.py"):
        fresh = (tmp_path / "cluster/proto" / name).read_text()
        committed = (ROOT / "cluster/proto" / name).read_text()
        assert fresh == committed, f"{name} is stale: regenerate it (command at the top of inference.proto)"


def test_nothing_in_the_project_turns_ray_token_authentication_off() -> None:
    """Ray 2.60 enables token authentication by default; no config, script or code may disable it."""
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    texts = [ROOT / f for f in tracked if f.endswith((".py", ".yaml", ".yml", ".sh", ".md", ".toml")) or f == ".ci/run"]
    disabling = re.compile(r"RAY_AUTH_MODE\W{0,8}disabled", re.IGNORECASE)  # env var, export, dict entry
    offenders = [
        str(p.relative_to(ROOT)) for p in texts
        if p.is_file() and p.name != "test_deploy.py" and disabling.search(p.read_text(errors="ignore"))
    ]  # fmt: skip
    assert offenders == []
