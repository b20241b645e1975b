"""Prometheus metrics of the HTTP/gRPC front door, in one registry per ingress replica."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("mixtral_requests", "Requests by route and status", ["route", "status"], registry=r)
        self.prompt_tokens = Counter("mixtral_prompt_tokens", "Prompt tokens of admitted requests", registry=r)
        self.generated_tokens = Counter("mixtral_generation_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram(
            "mixtral_time_to_first_token_seconds", "Request start to first token", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.itl = Histogram(
            "mixtral_inter_token_latency_seconds", "Time between streamed updates", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.running = Gauge("mixtral_running_sequences", "Sequences in the running batch", ["replica"], registry=r)
        self.waiting = Gauge("mixtral_waiting_sequences", "Sequences waiting to be scheduled", ["replica"], registry=r)
        self.kv_blocks = Gauge("mixtral_kv_blocks_in_use", "KV cache blocks in use", ["replica"], registry=r)
        labels = ["replica", "layer", "expert"]
        self.expert_tokens = Gauge("mixtral_expert_tokens", "Tokens routed to each expert", labels, registry=r)
        self.group_tokens = Gauge("mixtral_expert_group_tokens", "(token, expert) pairs each expert group "
                                  "computed since the last placement", ["replica", "group"], registry=r)  # fmt: skip
        self.imbalance = Gauge("mixtral_expert_imbalance", "Heaviest expert group's pairs over the mean, "
                               "averaged over layers, since the last placement", ["replica"], registry=r)  # fmt: skip
        self.cost_imbalance = Gauge("mixtral_expert_cost_imbalance", "Slowest expert group's seconds over the "
                                    "mean by the cost model, per step phase, since the last placement",
                                    ["replica", "phase"], registry=r)  # fmt: skip
        self.expert_ms = Gauge("mixtral_expert_ms_per_step", "The slowest expert group's milliseconds per step by "
                               "the cost model (summed over layers), per phase, since the last placement",
                               ["replica", "phase"], registry=r)  # fmt: skip

    def observe_engine(self, stats: dict[str, Any]) -> None:
        replica = str(stats["replica"])
        self.running.labels(replica).set(stats["running"])
        self.waiting.labels(replica).set(stats["waiting"])
        self.kv_blocks.labels(replica).set(stats["blocks_in_use"])
        for layer, row in enumerate(stats["expert_tokens"]):
            for expert, n in enumerate(row):
                self.expert_tokens.labels(replica, str(layer), str(expert)).set(n)
        for group, n in enumerate(stats["tokens_per_group"]):
            self.group_tokens.labels(replica, str(group)).set(n)
        self.imbalance.labels(replica).set(stats["imbalance"])
        for phase, value in stats["cost_imbalance"].items():
            self.cost_imbalance.labels(replica, phase).set(value)
        for phase, value in stats["expert_ms_per_step"].items():
            self.expert_ms.labels(replica, phase).set(value)

    def render(self) -> bytes:
        return generate_latest(self.registry)
