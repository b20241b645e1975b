"""Placement on a simulated multi-node cluster with fake GPUs: workers land where the
placement group put their bundles, one GPU each, and the model copy still answers correctly."""

from __future__ import annotations

import time
from collections import Counter

import pytest
import ray
from ray.cluster_utils import Cluster
from ray.util.placement_group import placement_group_table

from cluster.engine.request import SamplingParams
from cluster.llm import LLM
from protocol.experts import PlacementError
from tests.support.common import ENGINE_CONFIG, random_prompts, reference_greedy

pytestmark = pytest.mark.ray

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def three_nodes():
    ray.shutdown()  # the shared local Ray (tests.support.common.local_ray), if a module before started it
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 0})  # a CPU head
    gpu_nodes = [cluster.add_node(num_cpus=8, num_gpus=4) for _ in range(2)]
    ray.init(address=cluster.address)
    cluster.wait_for_nodes()
    yield cluster, {n.node_id for n in gpu_nodes}
    ray.shutdown()
    cluster.shutdown()


@pytest.mark.parametrize(("strategy", "per_node"), [("PACK", [2, 4]), ("SPREAD", [3, 3])])
def test_workers_land_where_the_plan_says(three_nodes, checkpoint_factory, strategy: str, per_node: list[int]) -> None:
    _, gpu_nodes = three_nodes
    ckpt = checkpoint_factory(ENGINE_CONFIG, seed=5)
    deadline = time.monotonic() + 30  # the previous case's actors and group are released asynchronously
    while ray.available_resources().get("GPU", 0) < 8 and time.monotonic() < deadline:
        time.sleep(0.2)
    with LLM(ckpt, attention_shards=2, routers=1, expert_groups=3, block_size=4, num_blocks=64,
             placement_strategy=strategy, worker_resources={"GPU": 1.0, "CPU": 1.0}) as llm:  # fmt: skip
        backend = llm.backend
        table = placement_group_table(backend.workers.pg)
        where = list(backend.reports("where").values())
        for i, w in enumerate(where):
            assert w["node_id"] == table["bundles_to_node_id"][i], w["name"]
            assert w["placement_group_id"] == backend.workers.pg.id.hex()
            assert len(w["gpu_ids"]) == 1, w["name"]
        nodes = Counter(w["node_id"] for w in where)
        assert set(nodes) <= gpu_nodes  # never on the CPU-only head
        assert sorted(nodes.values()) == per_node
        for node in nodes:  # one GPU per worker: NCCL allows one rank per GPU
            gpus = [w["gpu_ids"][0] for w in where if w["node_id"] == node]
            assert len(set(gpus)) == len(gpus)
        prompts = random_prompts(3, seed=31)
        outs = llm.generate(prompts, GREEDY)
        if strategy == "PACK":  # 6 of 8 GPUs taken: a second copy of 3 waits, then says why
            with pytest.raises(PlacementError, match=r"was not placed within 3 s.*'GPU': 2\.0"):
                LLM(ckpt, placement_timeout_s=3, worker_resources={"GPU": 1.0, "CPU": 1.0})
            states = Counter(pg["state"] for pg in placement_group_table().values())
            assert states["CREATED"] == 1 and states["PENDING"] == 0  # the refused copy left nothing behind
    assert [o.token_ids for o in outs] == reference_greedy(ckpt, prompts, 8)


def test_a_plan_that_cannot_fit_fails_fast(three_nodes, checkpoint_factory) -> None:
    with pytest.raises(PlacementError, match=r"needs 12 GPU \(the cluster has 8\)"):
        LLM(checkpoint_factory(ENGINE_CONFIG, seed=5), attention_shards=2, routers=2, expert_groups=8,
            worker_resources={"GPU": 1.0, "CPU": 1.0})  # fmt: skip
    with pytest.raises(PlacementError, match="STRICT_SPREAD needs one node per bundle"):
        LLM(checkpoint_factory(ENGINE_CONFIG, seed=5), attention_shards=1, routers=1, expert_groups=2,
            placement_strategy="STRICT_SPREAD", worker_resources={"GPU": 1.0, "CPU": 1.0})  # fmt: skip
