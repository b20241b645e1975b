"""Every config key reaches the code that uses it.

One table: per key of `ServeConfig` (every section), a value other than the default and a check
that reads the effect back from where it lands: a worker actor's own state (threads, dtype,
kernels, cache blocks, assigned resources), the engine's scheduler, the placement group, the
`LLMServer`, the Serve deployment options, the CLI's `serve.start` options, or `plan`. A key
added to the config without a row here fails `test_every_config_key_has_a_check`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import ray

from cluster.cli import plan_rows, serve_options
from cluster.engine.block_pool import blocks_for_budget
from cluster.engine.request import RequestError, SamplingParams
from cluster.llm import LLM
from cluster.serving.app import build_app
from cluster.serving.config import ServeConfig
from cluster.serving.ingress import Ingress
from cluster.serving.llm_server import LLMServer
from model.checkpoint import Checkpoint
from model.config import ModelConfig
from protocol.config import section_of
from tests.support.common import ENGINE_CONFIG, local_ray

pytestmark = pytest.mark.serve


@dataclass
class Running:
    """The objects a config reaches: a copy on Ray (through `LLMServer`), a single-process copy,
    the Serve app built from the config, and the CLI's derived options."""

    cfg: ServeConfig
    server: LLMServer
    single: LLM
    single_cfg: ServeConfig
    settings: dict[str, dict[str, Any]]  # worker name -> Worker.settings()
    where: dict[str, dict[str, Any]]  # worker name -> Worker.where()
    app: Any

    @property
    def llm(self) -> LLM:
        return self.server.llm

    @property
    def llm_deployment(self) -> Any:
        """The LLMServer deployment: the ingress is bound to it (Ingress.bind(LLMServer.bind(cfg), cfg))."""
        return self.app._bound_deployment.init_args[0]._bound_deployment

    @property
    def llm_options(self) -> Any:
        return self.llm_deployment._deployment_config


def _workers(run: Running, role: str, what: str = "settings") -> list[dict[str, Any]]:
    table = run.settings if what == "settings" else run.where
    return [v for k, v in table.items() if k.startswith(role)]


def _all_workers(run: Running, key: str) -> set[Any]:
    return {v[key] for v in run.settings.values()}


# key -> (value to set, read-back from the running objects); the read-back must equal the value.
Check = tuple[Any, Callable[[Running], Any]]
CHECKS: dict[str, Check] = {
    # model
    "checkpoint": (None, lambda r: _all_workers(r, "checkpoint") == {str(r.cfg.model.checkpoint)} or None),
    "name": ("my-model", lambda r: Ingress(None, r.cfg).model_name),  # type: ignore[arg-type]
    "preset": ("tiny", lambda r: "tiny" if ModelConfig.from_checkpoint(r.cfg.model.checkpoint) == _TINY else None),
    "write_if_missing": (True, lambda r: r.cfg.model.checkpoint.is_dir()),
    "seed": (11, lambda r: 11 if _same_weights(r.cfg.model.checkpoint, seed=11) else None),
    "dtype": ("bfloat16", lambda r: _all_workers(r, "dtype").pop()),
    # cluster
    "attention_shards": (2, lambda r: len(_workers(r, "attention"))),
    "routers": (2, lambda r: len(_workers(r, "router"))),
    "expert_groups": (3, lambda r: len(_workers(r, "experts"))),
    "single_process": (True, lambda r: r.single.backend.num_shards == 1 and not r.single.backend.reports("where")),
    "device": ("cpu", lambda r: _all_workers(r, "device").pop()),  # cuda needs a GPU: tests/test_gpu.py
    "placement_strategy": ("SPREAD", lambda r: ray.util.placement_group_table(r.llm.backend.workers.pg)["strategy"]),
    "placement_timeout_s": (77.0, lambda r: r.llm.backend.setup.config.cluster.placement_timeout_s),
    "gpus_per_node": (2, lambda r: _plan_workers_per_node(r.cfg, gpus_per_node=2)),
    "gpu_memory_gb": (0.001, lambda r: 0.001 if _plan_refuses(r.cfg, gpu_memory_gb=0.001) else None),
    "torch_threads": (2, lambda r: _all_workers(r, "torch_threads").pop()),
    "transport": ("gloo", lambda r: _all_workers(r, "transport").pop()),  # nccl needs GPUs: tests/test_gpu.py
    "redundant_experts": (2, lambda r: sum(len(w["slots"][0]) for w in _workers(r, "experts")) - 8),
    "rebalance_interval_s": (3600.0, lambda r: r.llm.engine.experts.interval_s),
    "data_plane_timeout_s": (
        7.0,
        lambda r: _all_workers(r, "data_plane_timeout_s").pop(),
    ),  # its use: hosts/test_host_outage
    "network_interface": (
        "lo",
        lambda r: {w["interface"] for w in r.where.values()}.pop(),
    ),  # auto: hosts/test_copy_across_hosts
    "worker_resources": ({"CPU": 2.0}, lambda r: {"CPU": {w["resources"]["CPU"] for w in r.where.values()}.pop()}),
    # engine
    "block_size": (8, lambda r: {r.llm.engine.scheduler.block_size, *(w["block_size"] for w in _workers(r, "att"))}),
    "kv_cache_gb": (0.002, lambda r: 0.002 if _single_blocks(r) == _budget_blocks(r, 0.002) else None),
    "num_blocks": (40, lambda r: {w["num_blocks"] for w in _workers(r, "attention")}.pop()),
    "max_batched_tokens": (48, lambda r: r.llm.engine.scheduler.max_batched_tokens),
    "max_seqs": (24, lambda r: r.llm.engine.scheduler.max_seqs),
    "max_model_len": (300, lambda r: r.llm.engine.max_model_len),
    "step_timeout_s": (99.0, lambda r: r.llm.backend.step_timeout_s),
    "kv_overcommit": (2.0, lambda r: r.server.token_budget / r.llm.engine.kv_capacity_tokens),
    "kernels": ("torch", lambda r: _all_workers(r, "kernels").pop()),
    "prefix_caching": (False, lambda r: {p.caching for p in r.llm.engine.scheduler.blocks.pools}.pop()),
    "max_n": (5, lambda r: _largest_n(r.llm)),
    # serving
    "host": ("127.0.0.2", lambda r: serve_options(r.cfg)["http_options"].host),
    "http_port": (18123, lambda r: serve_options(r.cfg)["http_options"].port),
    "grpc_port": (19123, lambda r: serve_options(r.cfg)["grpc_options"].port),
    "request_timeout_s": (123.0, lambda r: serve_options(r.cfg)["http_options"].request_timeout_s),
    "api_key": ("sesame", lambda r: Ingress(None, r.cfg).serving.api_key),  # type: ignore[arg-type]
    "min_replicas": (2, lambda r: r.llm_options.autoscaling_config.min_replicas),
    "max_replicas": (3, lambda r: r.llm_options.autoscaling_config.max_replicas),
    "max_ongoing_requests": (7, lambda r: r.llm_deployment.max_ongoing_requests),
    "max_queued_requests": (9, lambda r: r.llm_deployment.max_queued_requests),
    "target_ongoing_requests": (
        5.0,
        lambda r: r.llm_options.autoscaling_config.target_ongoing_requests,
    ),
    "max_body_bytes": (5000, lambda r: Ingress(None, r.cfg).serving.max_body_bytes),  # type: ignore[arg-type]
    "health_check_period_s": (
        6.0,
        lambda r: r.llm_options.health_check_period_s,
    ),
    "retry_after_s": (12, lambda r: Ingress(None, r.cfg).serving.retry_after_s),  # type: ignore[arg-type]
}
_TINY = ModelConfig.preset("tiny")
SINGLE_ONLY = {"single_process", "kv_cache_gb"}  # set on the single-process copy; the Ray copy sets num_blocks


def _same_weights(path: Path, seed: int) -> bool:
    """The checkpoint holds the seeded weights of that seed (its first tensor, compared)."""
    from model.checkpoint_writers import write_random_checkpoint

    name = "model.embed_tokens.weight"
    ((_, ours),) = Checkpoint(path).read([name])
    other = write_random_checkpoint(_TINY, path.parent / f"seed-{seed}-again", seed=seed)
    ((_, theirs),) = Checkpoint(other).read([name])
    return bool((ours == theirs).all())


def _plan_workers_per_node(cfg: ServeConfig, **cluster: Any) -> int:
    """The most workers `plan` puts on one node (PACK fills each node's GPUs)."""
    gpu = cfg.model_copy(update={"cluster": cfg.cluster.model_copy(update={"device": "cuda", **cluster})})
    rows, _ = plan_rows(gpu)
    return max(Counter(node for _, node, _, _, _ in rows).values())


def _plan_refuses(cfg: ServeConfig, **cluster: Any) -> bool:
    gpu = cfg.model_copy(update={"cluster": cfg.cluster.model_copy(update={"device": "cuda", **cluster})})
    _, problems = plan_rows(gpu)
    return any("GB of weights" in p for p in problems)


def _largest_n(llm: LLM) -> int:
    """The most choices the engine takes: n = 5 passes its check, 6 is refused naming `n`."""
    llm.check([1, 2], SamplingParams(n=5))
    with pytest.raises(RequestError) as e:
        llm.check([1, 2], SamplingParams(n=6))
    assert e.value.param == "n"
    return 5


def _single_blocks(r: Running) -> int:
    return int(r.single.engine.backend.shard.cache.num_blocks)  # type: ignore[attr-defined]


def _budget_blocks(r: Running, gb: float) -> int:
    return blocks_for_budget(r.single.model_config, r.single_cfg.engine.block_size, r.single.dtype, int(gb * (1 << 30)))


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory, checkpoint_factory: Any) -> Iterator[Running]:
    local_ray()
    values = {k: v for k, (v, _) in CHECKS.items() if k not in SINGLE_ONLY}
    values["checkpoint"] = tmp_path_factory.mktemp("written") / "ckpt"  # written by the copy itself
    cfg = ServeConfig.model_validate(_nest(values))
    single_cfg = ServeConfig.model_validate(_nest({
        "checkpoint": checkpoint_factory(ENGINE_CONFIG, seed=5), "single_process": True,
        "kv_cache_gb": CHECKS["kv_cache_gb"][0],
    }))  # fmt: skip
    server = LLMServer(cfg)
    single = LLM(single_cfg)
    try:
        backend = server.llm.backend
        yield Running(cfg, server, single, single_cfg, backend.reports("settings"), backend.reports("where"),
                      build_app(cfg))  # fmt: skip
    finally:
        single.shutdown()
        server.llm.shutdown()


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    where = section_of(ServeConfig)
    out: dict[str, dict[str, Any]] = {}
    for key, value in flat.items():
        out.setdefault(where[key], {})[key] = value
    return out


def test_every_config_key_has_a_check() -> None:
    assert set(CHECKS) == set(section_of(ServeConfig))


@pytest.mark.parametrize("key", sorted(CHECKS))
def test_the_key_reaches_its_user(running: Running, key: str) -> None:
    value, read_back = CHECKS[key]
    observed = read_back(running)
    if key == "checkpoint":
        assert observed is True, "every worker opened the configured checkpoint"
    elif key == "block_size":
        assert observed == {value}, "the scheduler and every attention shard use it"
    else:
        assert observed == value
