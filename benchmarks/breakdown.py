"""Where a cluster step's time goes, and what the data plane's collectives cost on their own.

Breakdown of a decode step (every sequence decoding, so each step has the same shape), from the
per-step records of the engine and of every worker (`LLM.profile`):

    attention   the shard's embedding, attention and residuals, all layers
    head        final norm, lm_head and sampling
    gating      the router's gate, top-k and combine
    expert_ffn  the slowest expert group's grouped FFN
    data_plane  what the shard waited for that was not gating or expert compute: the p2p hops
                shard <-> router and the three all_to_all_single per layer
    control     the engine's step minus the shard's step: scheduling, the Ray calls, detokenising

The parts add up to the engine's step. The micro-benchmark starts the same processes (A shards,
R routers, G groups in a gloo/NCCL group), runs only the per-layer communication with buffers
of the same sizes, and times it at the shard: the raw cost the data plane is judged against.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import ray
import torch

from actors.data_plane import DataPlane
from actors.worker import free_address
from cluster.backend.placement import Layout, worker_specs
from model.config import ModelConfig
from protocol.config import Transport

PARTS = ("attention", "head", "gating", "expert_ffn", "data_plane", "control")


def decode_breakdown(profile: dict[str, Any], decode: bool = True) -> dict[str, float]:
    """Mean milliseconds per decode step (`decode=False`: per step with a prompt chunk) of each part
    (and `step`, `steps`), from `LLM.step_profile()`."""
    engine = profile["engine"]
    workers = profile["workers"]
    shards = [v for k, v in workers.items() if k.startswith("attention")]
    routers = [v for k, v in workers.items() if k.startswith("router")]
    groups = [v for k, v in workers.items() if k.startswith("experts")]
    rows: list[dict[str, float]] = []
    for i, rec in enumerate(engine):
        if rec["decode"] != decode:
            continue
        busy = [s[i] for s in shards if "attention" in s[i]]  # shards with sequences this step
        shard = {k: statistics.fmean(s.get(k, 0.0) for s in busy) for k in ("attention", "head", "moe_wait")}
        shard_total = max(s["total"] for s in busy)
        gating = statistics.fmean(r[i].get("gating", 0.0) for r in routers)
        ffn = max(g[i].get("expert_ffn", 0.0) for g in groups)
        rows.append({
            "attention": shard["attention"],
            "head": shard["head"],
            "gating": gating,
            "expert_ffn": ffn,
            "data_plane": max(shard["moe_wait"] - gating - ffn, 0.0),
            "control": max(rec["wall"] - shard_total, 0.0),
            "step": rec["wall"],
            "tokens": rec["tokens"],
        })  # fmt: skip
    if not rows:
        raise ValueError(f"no {'decode' if decode else 'prefill'} steps were recorded")
    out = {k: 1000 * statistics.fmean(r[k] for r in rows) for k in (*PARTS, "step")}
    out["data_plane_median"] = 1000 * statistics.median(r["data_plane"] for r in rows)
    out["steps"] = len(rows)
    out["tokens_per_step"] = statistics.fmean(r["tokens"] for r in rows)
    return out


# ---- the raw collectives -------------------------------------------------------------------------


class _Peer:
    """One process of the micro-benchmark: a rank in the same group layout as a model copy."""

    def __init__(self, rank: int, role: str, device: str, transport: Transport) -> None:
        torch.set_num_threads(1)
        self.rank, self.role, self.transport = rank, role, transport
        self.device = torch.device("cuda", 0) if device == "cuda" else torch.device("cpu")
        self.plane: DataPlane | None = None

    def address(self) -> tuple[str, int]:
        return free_address()

    def join(self, addr: str, port: int, world: int, moe_ranks: list[int]) -> None:
        self.plane = DataPlane.join(self.transport, self.device, addr, port, self.rank, world, moe_ranks, timeout_s=120)

    def run(self, plan: dict[str, Any], iterations: int) -> list[float]:
        """Seconds per layer's worth of communication, per iteration (measured on shards; 0 elsewhere)."""
        h, dtype, dev, plane = plan["hidden"], plan["dtype"], self.device, self.plane
        assert plane is not None
        r, g = plan["routers"], plan["groups"]
        p = r + g
        times = []
        for _ in range(iterations):
            start = time.perf_counter()
            if self.role == "attention":
                t = plan["shard_tokens"][self.rank]
                x = torch.zeros(t, h, dtype=dtype, device=dev)
                plane.send_recv(sends=[(plan["router_of_shard"][self.rank], x)])
                plane.send_recv(recvs=[(plan["router_of_shard"][self.rank], torch.empty_like(x))])
            elif self.role == "router":
                mine = plan["router_shards"][self.rank]
                plane.send_recv(
                    recvs=[(s, torch.empty(plan["shard_tokens"][s], h, dtype=dtype, device=dev)) for s in mine]
                )
                counts = plan["router_rows"][self.rank]  # rows to each group
                none = [0] * r
                plane.all_to_all_counts(
                    torch.empty(p, dtype=torch.long, device=dev), torch.tensor(none + counts, device=dev)
                )
                rows = torch.zeros(sum(counts), h + 1, dtype=dtype, device=dev)
                plane.all_to_all(rows.new_empty(0, h + 1), rows, [0] * p, none + counts)
                back = torch.empty(sum(counts), h, dtype=dtype, device=dev)
                plane.all_to_all(back, back.new_empty(0, h), none + counts, [0] * p)
                plane.send_recv(
                    sends=[(s, torch.zeros(plan["shard_tokens"][s], h, dtype=dtype, device=dev)) for s in mine]
                )
            else:
                got = torch.empty(p, dtype=torch.long, device=dev)
                plane.all_to_all_counts(got, torch.zeros(p, dtype=torch.long, device=dev))
                from_routers = got[:r].tolist()
                rows = torch.empty(sum(from_routers), h + 1, dtype=dtype, device=dev)
                plane.all_to_all(rows, rows.new_empty(0, h + 1), from_routers + [0] * g, [0] * p)
                y = torch.zeros(sum(from_routers), h, dtype=dtype, device=dev)
                plane.all_to_all(y.new_empty(0, h), y, [0] * p, from_routers + [0] * g)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return times if self.role == "attention" else []


def raw_collectives_ms(
    config: ModelConfig,
    layout: Layout,
    tokens_per_step: int,
    dtype: torch.dtype,
    device: str,
    transport: Transport,
    iterations: int = 200,
    gpu_per_peer: float = 1.0,
) -> float:
    """Median milliseconds of one layer's communication at the shards, tokens spread evenly, no compute."""
    specs = worker_specs(layout, config.num_experts)
    a, r, g = layout.attention_shards, layout.routers, layout.expert_groups
    shard_tokens = [tokens_per_step // a + (i < tokens_per_step % a) for i in range(a)]
    router_of_shard = {s.rank: a + s.router for s in specs if s.role == "attention"}
    router_shards = {s.rank: [a_ for a_ in s.shards] for s in specs if s.role == "router"}
    group_of = [0] * config.num_experts
    for s in specs:
        for e in s.experts:
            group_of[e] = s.index
    router_rows = {}
    for rank, shards in router_shards.items():  # each token goes to K experts, spread evenly over experts
        pairs = sum(shard_tokens[s] for s in shards) * config.experts_per_token
        per_expert = [pairs // config.num_experts + (e < pairs % config.num_experts) for e in range(config.num_experts)]
        router_rows[rank] = [sum(n for e, n in enumerate(per_expert) if group_of[e] == grp) for grp in range(g)]
    plan = {
        "hidden": config.hidden_size, "dtype": dtype, "routers": r, "groups": g, "shard_tokens": shard_tokens,
        "router_of_shard": router_of_shard, "router_shards": router_shards, "router_rows": router_rows,
    }  # fmt: skip
    gpu = gpu_per_peer if device == "cuda" else 0
    peer: Any = ray.remote(num_cpus=0 if gpu else 1, num_gpus=gpu)(_Peer)
    peers: list[Any] = [peer.remote(s.rank, s.role, device, transport) for s in specs]
    try:
        addr, port = ray.get(peers[0].address.remote())
        moe_ranks = [s.rank for s in specs if s.role != "attention"]
        ray.get([p.join.remote(addr, port, len(specs), moe_ranks) for p in peers])
        ray.get([p.run.remote(plan, 20) for p in peers])  # warm-up
        times = [t for ts in ray.get([p.run.remote(plan, iterations) for p in peers]) for t in ts]
    finally:
        for p in peers:
            ray.kill(p)
    return 1000 * statistics.median(times)
