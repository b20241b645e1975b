"""AttentionShard: embeddings, attention of every layer, the final norm, lm_head, sampling,
and the paged KV cache of the sequences that live on it.

Shape legend: T = this shard's tokens in the step, H = hidden, R = rows that need logits, V = vocab.

It runs the model's one layer loop (`Mixtral.hidden_states`); the MoE half of each layer is
`moe_over_data_plane`: the rows go to this shard's router and the combined output comes back.
"""

from __future__ import annotations

from typing import Any

import torch

from actors.worker import Worker
from protocol.shard_runner import ShardRunner
from protocol.step import Sampled, ShardBatch
from protocol.worker import WorkerSetup, WorkerSpec


class AttentionShard(Worker):
    def __init__(self, spec: WorkerSpec, setup: WorkerSetup) -> None:
        super().__init__(spec, setup)
        self.router_rank = setup.router_ranks[spec.router]
        block_size = setup.config.engine.block_size
        self.shard = ShardRunner(self.config, setup.num_blocks, block_size, self.dtype, self.device)

    def run_step(self, batch: ShardBatch) -> list[Sampled]:
        clock = self.clock
        clock.begin_step()
        self.shard.begin(batch)
        if not batch.chunks:  # nothing here this step; the router expects no rows from us
            clock.end_step()
            return []
        with clock("attention"):  # the layer loop; its moe_wait spans are charged to moe_wait
            p, cache = self.shard.pack(batch)
            h = self.model.hidden_states(
                p.tokens, p.positions, p.seq_lens, cache, self.moe_over_data_plane, p.logit_rows
            )  # [R, H]
        with clock("head"):
            sampled = self.shard.draw(batch, self.model.lm_head(h), p.spans)  # logits [R, V]
        clock.end_step()
        return sampled

    def moe_over_data_plane(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """A layer's MoE half: x [T, H] to the router, its combined expert output [T, H] back."""
        with self.clock("moe_wait"):  # the router, the expert groups and the wires between
            self.data_plane.send_recv(sends=[(self.router_rank, x)])
            out = torch.empty_like(x)
            self.data_plane.send_recv(recvs=[(self.router_rank, out)])
        return out

    def settings(self) -> dict[str, Any]:
        return super().settings() | {
            "num_blocks": self.shard.cache.num_blocks,
            "block_size": self.shard.cache.block_size,
        }
