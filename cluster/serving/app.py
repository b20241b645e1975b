"""The Ray Serve application: an OpenAI-compatible HTTP + gRPC ingress in front of model copies.

    app = build_app(ServeConfig.load("configs/tiny.yaml"))
    serve.run(app)

Two deployments: `Ingress` (`cluster/serving/ingress.py`: routes, validation, API key, SSE, gRPC) and
`LLMServer` (`cluster/serving/llm_server.py`: one replica = one model copy, autoscaled by whole copies).
Everything about them is derived from the config here.
"""

from __future__ import annotations

from typing import Any

from ray import serve

from cluster.backend.placement import worker_resources
from cluster.serving.config import ServeConfig
from cluster.serving.ingress import Ingress
from cluster.serving.llm_server import LLMServer

HEALTH_CHECK_TIMEOUT_S = 60
# A stopping replica checks for requests still running this often (Serve's default, 2 s, made every
# idle replica wait that long before it stops; in-flight requests are still waited for, up to
# Serve's graceful_shutdown_timeout_s).
DRAIN_CHECK_S = 0.2


def build_app(config: ServeConfig) -> Any:
    """The Serve `Application` for a config: an ingress bound to an autoscaled `LLMServer`."""
    srv = config.serving
    bundles = config.replica_bundles(config.model_shape().num_experts)
    # Bundle 0 is the replica's. Its CPU is for the engine loop; a single-process copy also computes
    # there, and on a GPU it must ask for the bundle's GPU to see it.
    actor_options: dict[str, Any] = {"num_cpus": 0}
    if config.cluster.single_process:
        actor_options["num_gpus"] = worker_resources(config.cluster).get("GPU", 0)
    llm_deployment: Any = serve.deployment(
        LLMServer,
        name="LLMServer",
        placement_group_bundles=bundles,
        placement_group_strategy=config.cluster.placement_strategy,
        ray_actor_options=actor_options,
        max_ongoing_requests=srv.max_ongoing_requests,
        max_queued_requests=srv.max_queued_requests,
        autoscaling_config={
            "min_replicas": srv.min_replicas,
            "max_replicas": srv.max_replicas,
            "target_ongoing_requests": srv.target_ongoing_requests,
        },
        health_check_period_s=srv.health_check_period_s,
        health_check_timeout_s=HEALTH_CHECK_TIMEOUT_S,
        graceful_shutdown_wait_loop_s=DRAIN_CHECK_S,
    )
    ingress: Any = serve.deployment(serve.ingress()(Ingress), name="Ingress", max_ongoing_requests=10_000,
                                    graceful_shutdown_wait_loop_s=DRAIN_CHECK_S)  # fmt: skip
    return ingress.bind(llm_deployment.bind(config), config)


def app_builder(args: dict[str, Any]) -> Any:
    """For Serve config files: `import_path: cluster.serving.app:app_builder`, `args: {config: path}`."""
    return build_app(ServeConfig.load(args["config"]))
