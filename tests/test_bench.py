"""`mixtral-cluster bench` end to end on the tiny model: every part runs and its files are written.

The figures themselves are not asserted (this machine is noisy); their presence, consistency and
the agreement of the three systems' greedy outputs are.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmarks.breakdown import PARTS, decode_breakdown
from benchmarks.roofline import decode_bytes
from benchmarks.run import main
from benchmarks.workload import mixed_prompts
from model import ModelConfig

pytestmark = pytest.mark.serve


def test_bench_quick_on_tiny_writes_json_markdown_and_plots(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    args = ["--quick", "--preset", "tiny", "--cache-dir", str(tmp_path / "ckpt"), "--prompts", "4", "--new-tokens",
            "6", "--max-len", "40", "--concurrency", "1", "3", "--threads", "1", "--json", str(out)]  # fmt: skip
    assert main(args) == 0
    r = json.loads(out.read_text())
    assert set(r["throughput_tok_s"]) == {"hf", "single", "cluster"}
    assert all(v > 0 for v in r["throughput_tok_s"].values())
    for agreement in r["agreement"].values():
        assert agreement["identical"] == agreement["prompts"] == 4  # greedy outputs agree
    assert [row["concurrency"] for row in r["latency"]] == [1, 3]
    assert all(row["requests"] == 2 * row["concurrency"] for row in r["latency"])
    b = r["breakdown"]
    assert abs(sum(b[p] for p in PARTS) - b["step"]) < 0.05 * b["step"] + 1e-6  # the parts make up the step
    assert b["tokens_per_step"] == 8  # the quick decode batch
    assert r["collectives"]["raw_per_layer_ms"] > 0
    assert r["roofline"]["floor_ms"] > 0 and r["roofline"]["ratio"] > 0
    rb = r["roofline_batch"]
    assert rb["batch"] == 8 and rb["bytes_per_step"] > r["roofline"]["bytes_per_step"] and rb["step_ms"] > 0
    sk = r["skewed"]
    assert sk["before"]["imbalance"] >= 2 > sk["after"]["imbalance"]  # one hot group, then spread
    assert sk["before"]["tokens_per_s"] > 0 and sk["after"]["tokens_per_s"] > 0 and sk["rebalance"]["moved"] > 0
    for phase in ("before", "after"):  # a 512-token prompt in one step, and the cost model's view of each phase
        assert sk[phase]["prefill_breakdown"]["tokens_per_step"] == 512 and sk[phase]["prefill_breakdown"]["step"] > 0
        assert set(sk[phase]["cost_imbalance"]) == {"decode", "prefill"}
    assert all(v["expert_ms_after"] < v["expert_ms_before"] for v in sk["rebalance"]["phases"].values())
    paired = sk["paired"]  # the two placements again in turn: one round in --quick
    for p in ("before", "after"):
        assert len(paired[p]["decode_ms"]) == len(paired[p]["prefill_ms"]) == paired["rounds"] == 1
        assert paired[p]["decode_ms_median"] > 0 and paired[p]["prefill_ms_median"] > 0
    assert all(sk["after"]["cost_imbalance"][p] < sk["before"]["cost_imbalance"][p] for p in ("decode", "prefill"))
    pc = r["prefix_cache"]
    assert pc["cached_tokens"] >= pc["prefix_tokens"] - 16 and pc["cold_ms"] > 0 and pc["warm_ms"] > 0
    for suffix in (".md", "-throughput.png", "-latency.png", "-breakdown.png"):
        path = out.with_name("bench" + suffix)
        assert path.is_file() and path.stat().st_size > 0, path
    assert "| single-process engine |" in out.with_suffix(".md").read_text()


def test_bench_without_the_cluster_starts_no_workers(tmp_path: Path) -> None:
    """--skip cluster: what a one-GPU machine runs with the NCCL data plane (the single-process parts)."""
    out = tmp_path / "single.json"
    args = ["--quick", "--preset", "tiny", "--cache-dir", str(tmp_path / "ckpt"), "--prompts", "2", "--new-tokens",
            "4", "--max-len", "24", "--threads", "1", "--skip", "hf", "prefix", "roofline", "cluster",
            "--json", str(out)]  # fmt: skip
    assert main(args) == 0
    r = json.loads(out.read_text())
    assert set(r["throughput_tok_s"]) == {"single"}
    assert not {"breakdown", "skewed", "latency", "collectives"} & set(r)
    assert "| single-process engine |" in out.with_suffix(".md").read_text()


def test_decode_bytes_counts_what_one_token_reads() -> None:
    cfg = ModelConfig.preset("mini")
    h, i, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    attention = h * 512 + 2 * h * 128 + 512 * h + 2 * h  # 8 heads x 64, 2 kv heads x 64
    per_layer = attention + 2 * 3 * h * i + 8 * h  # two experts hit, the gate
    assert decode_bytes(cfg, 4) == 4 * (8 * per_layer + v * h + 2 * h)
    # 32 tokens read each expert that any of them is routed to: 8 * (1 - (6/8)^32) = 7.99 experts
    read = 8 * (1 - 0.75**32)
    assert decode_bytes(cfg, 4, batch=32) == int(4 * (8 * (per_layer + (read - 2) * 3 * h * i) + v * h + 2 * h))


def test_breakdown_parts_add_up_to_the_step() -> None:
    """Two decode steps and a prefill step (skipped), on one shard, a router and two groups."""
    engine = [{"wall": 0.5, "decode": False, "tokens": 40}] + [{"wall": 0.010, "decode": True, "tokens": 4}] * 2
    shard = [{"attention": 0.1, "total": 0.4}] + [{"attention": 0.002, "head": 0.001, "moe_wait": 0.005,
                                                   "total": 0.008}] * 2  # fmt: skip
    router = [{}] + [{"gating": 0.001}] * 2
    groups = [[{}] + [{"expert_ffn": 0.002}] * 2, [{}] + [{"expert_ffn": 0.001}] * 2]
    profile = {"engine": engine, "workers": {"attention-0": shard, "router-0": router, "experts-0": groups[0],
                                             "experts-1": groups[1]}}  # fmt: skip
    b = decode_breakdown(profile)
    assert b["steps"] == 2
    assert b["expert_ffn"] == 2.0  # the slowest group, ms
    assert abs(b["data_plane"] - 2.0) < 1e-9  # 5 ms waited - 1 gating - 2 expert compute
    assert abs(b["control"] - 2.0) < 1e-9  # 10 ms step - 8 ms at the shard
    assert abs(sum(b[p] for p in PARTS) - b["step"]) < 1e-9


def test_mixed_prompts_spread_their_lengths() -> None:
    prompts = mixed_prompts(32, 8, 512, 32768, seed=0)
    lengths = sorted(len(p) for p in prompts)
    assert lengths[0] == 8 and lengths[-1] == 512 and len(set(lengths)) == 32
    assert all(p[0] == 1 and min(p[1:]) >= 3 for p in prompts)
    assert prompts == mixed_prompts(32, 8, 512, 32768, seed=0)
    assert torch.tensor([len(p) for p in prompts]).float().mean() == 260
