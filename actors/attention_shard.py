"""AttentionShard: embeddings, attention of every layer, the final norm, lm_head, sampling,
and the paged KV cache of the sequences that live on it.

Shape legend: T = this shard's tokens in the step, H = hidden.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from actors.worker import Worker
from cluster.batch import Sampled, Sampler, pack
from cluster.placement import WorkerSpec
from cluster.protocol import StepPlan
from model.config import ModelConfig
from model.kv_cache import CacheBatch, KVCache


class AttentionShard(Worker):
    def __init__(
        self,
        spec: WorkerSpec,
        checkpoint: str,
        config: ModelConfig,
        dtype: torch.dtype,
        device: str,
        router_rank: int,
        num_blocks: int,
        block_size: int,
        torch_threads: int = 1,
    ) -> None:
        super().__init__(spec, checkpoint, config, dtype, device, torch_threads)
        self.router_rank = router_rank
        self.cache = KVCache.allocate(config, num_blocks, block_size, dtype, self.device)
        self.sampler = Sampler()

    @torch.inference_mode()
    def step(self, plan: StepPlan) -> list[Sampled]:
        clock = self.clock
        clock.begin_step()
        batch = plan.batches[self.spec.index]
        self.sampler.drop(batch.finished)
        if not batch.chunks:  # nothing here this step; the router expects no rows from us
            clock.end_step()
            return []
        m = self.model
        with clock("attention"):
            p = pack(batch, self.device)
            cache = CacheBatch(self.cache, p.block_tables)
            cos, sin, attn_plan = m.prepare(p.positions, p.seq_lens, cache)
            h = m.embed_tokens(p.tokens)  # [T, H]
        for i, layer in enumerate(m.decoder_layers()):
            with clock("attention"):
                x, moe_in = layer.attention_block(h, cos, sin, attn_plan, cache.layer(i))  # [T, H] each
            with clock("moe_wait"):  # the router, the expert groups and the wires between
                dist.send(moe_in.contiguous(), self.router_rank)
                moe_out = torch.empty_like(moe_in)  # [T, H]
                dist.recv(moe_out, self.router_rank)
            h = x + moe_out
        with clock("head"):
            logits = m.lm_head(m.norm(h[p.logit_rows]))  # [S', V]
            sampled = self.sampler.sample(batch, logits)
        clock.end_step()
        return sampled

    def cached_sequences(self) -> int:
        return len(self.sampler)
