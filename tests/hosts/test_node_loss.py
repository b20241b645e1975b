"""Node loss on a simulated cluster: the node holding an expert group disappears under load.

A CPU head (ingress, proxy) and three worker nodes with a `model_slot` resource that the model
copy's worker bundles ask for (SPREAD). The node of `experts-0` is removed while requests
decode. Ray places the lost bundles on the nodes left (they have room), the copy replaces the
workers it lost there and forms its data plane anew: no request fails, every answer equals the
fault-free one, the replacements live on the nodes left, and nothing leaks."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
from ray import serve
from ray.cluster_utils import Cluster

from cluster.engine.request import SamplingParams
from cluster.llm import LLM
from tests.support.common import ENGINE_CONFIG
from tests.support.serving import PROMPT, Load, census, census_back, serving, wait_until_serving

pytestmark = pytest.mark.serve


@pytest.fixture(scope="module")
def cluster(checkpoint_factory) -> Iterator[dict[str, Any]]:
    ckpt: Path = checkpoint_factory(ENGINE_CONFIG, seed=5)
    fast_failure = {"health_check_period_ms": 500, "health_check_failure_threshold": 4}
    ray.shutdown()  # the shared local Ray (tests.support.common.local_ray), if a module before started it
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 4, "_system_config": fast_failure})
    # Model nodes offer only model slots, as GPU nodes offer GPUs: the ingress, the proxy and each
    # replica's own bundle stay on the head, so losing a model node loses workers only.
    nodes = [c.add_node(num_cpus=0, resources={"model_slot": 2}) for _ in range(3)]
    ray.init(address=c.address)
    c.wait_for_nodes()
    sections = {
        "cluster": {"placement_strategy": "SPREAD", "worker_resources": {"model_slot": 1}},
        "serving": {"health_check_period_s": 1, "retry_after_s": 3},
    }
    with serving(ckpt, **sections) as s:
        yield {"cluster": c, "nodes": nodes, "url": s["url"]}
    ray.shutdown()
    c.shutdown()


@pytest.fixture(scope="module")
def expected(checkpoint_factory) -> dict[str, str]:
    with LLM(checkpoint_factory(ENGINE_CONFIG, seed=5), single_process=True) as llm:
        probe = llm.generate([PROMPT], SamplingParams(max_tokens=8, temperature=0.0))[0].text
        load = llm.generate([Load.PROMPT], SamplingParams(max_tokens=Load.MAX_TOKENS, temperature=0.0))[0].text
    return {"probe": probe, "load": load}


def test_losing_a_model_node_replaces_its_workers_on_the_nodes_left(
    cluster: dict[str, Any], expected: dict[str, str]
) -> None:
    url = cluster["url"]
    wait_until_serving(url, expected["probe"])
    before = census()
    workers = serve.get_deployment_handle("LLMServer", app_name="mixtral").workers.remote().result()
    where = {w["name"]: w["node_id"] for w in workers}
    victim = next(n for n in cluster["nodes"] if n.node_id == where["experts-0"])
    lost = sorted(name for name, node in where.items() if node == victim.node_id)
    with Load(url) as load:  # plain and streamed HTTP
        time.sleep(2.0)
        killed = time.monotonic()
        cluster["cluster"].remove_node(victim, allow_graceful=False)
        time.sleep(10.0)
    assert load.in_flight(killed), load.records
    failures = load.failures()
    assert not failures, f"the node of {lost} lost: {failures[:3]}"
    assert all(r["text"] == expected["load"] for r in load.records)
    workers = serve.get_deployment_handle("LLMServer", app_name="mixtral").workers.remote().result()
    assert sorted(w["name"] for w in workers) == sorted(where)
    assert all(w["node_id"] != victim.node_id for w in workers)  # the replacements live on the nodes left
    assert census_back(before) == before, f"actors or placement groups leaked (lost node held {lost})"
    logging.getLogger(__name__).info("node of %s lost: %d requests in flight, 0 failed, longest stall %.2f s",
                                     lost, len(load.in_flight(killed)), load.stall(killed))  # fmt: skip
