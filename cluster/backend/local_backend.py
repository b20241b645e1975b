"""`LocalBackend`: the whole model in the engine's process, one attention shard and no workers:
the fast CPU path and the baseline the cluster is measured against.

Shapes: L layers, E experts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from cluster.engine.backend import Executed, Report
from model.decode_graphs import DecodeGraphs
from model.kernels import CudaKernels
from model.loader import load_model
from model.mixtral import Mixtral
from protocol.config import EngineSection, LLMConfig
from protocol.expert_cost import TOKENS
from protocol.experts import Placement
from protocol.shard_runner import ShardRunner
from protocol.step import Sampled, ShardBatch


class LocalBackend:
    """The whole model in this process: one shard, one cache, no workers."""

    num_shards = 1
    num_groups = 1
    cost = TOKENS  # one group: nothing to split
    placement: Placement | None = None  # one set of every expert: nothing to move

    def __init__(self, model: Mixtral, num_blocks: int, settings: EngineSection, decode_graphs: bool = False) -> None:
        """`decode_graphs`: run decode steps through `DecodeGraphs` (up to the settings' context
        length and `max_seqs`), recorded as CUDA graphs on a GPU (the cache gets their scratch
        block on top)."""
        self.model = model
        self.recoveries: list[dict[str, Any]] = []  # no workers to lose
        self.slots: list[int] = []  # no expert groups
        weight = model.embed_tokens.weight
        graphs = (model, settings.context_length(model.config), settings.max_seqs) if decode_graphs else None
        self.shard = ShardRunner(model.config, num_blocks, settings.block_size, weight.dtype, weight.device, graphs)

    @classmethod
    def load(cls, checkpoint: Path, config: LLMConfig, num_blocks: int) -> LocalBackend:
        """The checkpoint's model on the config's device and kernels, loaded on this thread; decode
        steps are recorded as CUDA graphs where the kernels never read the device back (the cuda
        kernels on a GPU)."""
        model = load_model(checkpoint, config.dtype, config.cluster.device, kernels=config.engine.kernels)
        weight = model.embed_tokens.weight
        graphs = isinstance(model.kernels, CudaKernels) and CudaKernels.sync_free(weight.device, weight.dtype)
        return cls(model, num_blocks, config.engine, decode_graphs=graphs)

    @property
    def graphs(self) -> DecodeGraphs | None:
        return self.shard.graphs

    @torch.inference_mode()
    def execute(self, batches: list[ShardBatch]) -> Executed:
        (batch,) = batches
        self.shard.begin(batch)
        cfg, device = self.model.config, self.shard.cache.k.device
        counts = torch.zeros(cfg.num_layers, cfg.num_experts, dtype=torch.long, device=device)  # [L, E]
        sampled: list[Sampled] = []
        replayed = self.shard.replay(batch)
        if replayed is not None:  # a decode step at a fixed shape, replayed
            logits, counts = replayed
            sampled = self.shard.draw(batch, logits, [(i, i + 1) for i in range(len(batch.chunks))])
        elif batch.chunks:
            p, cache = self.shard.pack(batch)
            logits = self.model(p.tokens, p.positions, p.seq_lens, cache, p.logit_rows, expert_counts=counts)
            sampled = self.shard.draw(batch, logits, p.spans)
        counts = counts.cpu()  # the counters are read once per step
        pairs = counts.sum(dim=1, keepdim=True)  # one group: all the pairs, nothing to balance
        return Executed([sampled], counts, pairs, torch.zeros(pairs.shape, dtype=torch.float64))

    def stage_placement(self, placement: Placement) -> int:
        raise AssertionError("a single-process copy has no placement to stage (placement is None)")

    def switch_placement(self) -> tuple[bool, str | None]:
        return True, None

    def reports(self, report: Report) -> dict[str, Any]:
        return {}  # no workers: the engine's own step records are the profile

    def set_profiling(self, on: bool) -> None:
        pass

    def shutdown(self) -> None:
        pass
