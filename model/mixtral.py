"""The Mixtral decoder: embeddings, N x (attention + sparse MoE), final norm, lm_head.

Shape legend: T = packed tokens of all sequences in the call, H = hidden, V = vocab.

Parameter names follow the Hugging Face on-disk names without the `model.` prefix, except that
each layer's experts are stacked (`layers.{i}.block_sparse_moe.experts.w1` is [E, I, H]).

There is one layer loop (`Mixtral.hidden_states`). It takes the MoE half of each layer as a call
(`MoEStep`): in one process the layer's own `SparseMoE`; in an attention shard, "send the rows
to the router and wait for its answer". The router runs the same `SparseMoE` with the exchange
to the expert groups as its experts. The arithmetic is the `kernels` chosen when the model is
built (`model/kernels`).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence

import torch
from torch import nn

from model.attention import Attention
from model.attention_plan import AttentionPlan, plan_attention
from model.config import ALL_PARTS, ModelConfig, Part
from model.kernels import Kernels, TorchKernels
from model.kv_cache import CacheBatch
from model.linear import Linear
from model.moe import ExpertFFN, SparseMoE
from model.norm import RMSNorm
from model.rope import cos_sin

MoEStep = Callable[[int, torch.Tensor], torch.Tensor]
"""(layer index, the layer's normed residual [T, H]) -> the MoE block's output [T, H]."""


class DecoderLayer(nn.Module):
    """One layer, or the parts of it a worker holds (see `Mixtral`)."""

    def __init__(
        self, config: ModelConfig, parts: Collection[Part], experts: Sequence[int] | None, kernels: Kernels
    ) -> None:
        super().__init__()
        if "attention" in parts:
            self.input_layernorm = RMSNorm(config.hidden_size, config.norm_eps, kernels)
            self.self_attn = Attention(config, kernels)
            self.post_attention_layernorm = RMSNorm(config.hidden_size, config.norm_eps, kernels)
        if "gate" in parts or "experts" in parts:
            expert_ids = experts if "experts" in parts else ()
            self.block_sparse_moe: SparseMoE = SparseMoE(config, "gate" in parts, expert_ids, kernels)

    def attention_block(
        self,
        h: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        plan: AttentionPlan,
        kv: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """h [T, H] -> (x, moe_input): the residual after attention and its normed copy, both [T, H]."""
        x = h + self.self_attn(self.input_layernorm(h), cos, sin, plan, kv)
        return x, self.post_attention_layernorm(x)


class Mixtral(nn.Module):
    """The whole model, or only some `parts` of it (optionally a subset of `experts`).

    A partial model keeps the full model's parameter names, so one loader fills every worker:
    an attention shard is `Mixtral(c, parts={"embed", "attention", "head"})`, a router
    `Mixtral(c, parts={"gate"})`, an expert group `Mixtral(c, parts={"experts"}, experts=[3, 4])`.
    Only the whole model can run `forward`; an attention shard runs `hidden_states` with the MoE
    step that reaches its router, and the other actors drive the parts they hold.
    """

    def __init__(
        self,
        config: ModelConfig,
        parts: Collection[Part] = ALL_PARTS,
        experts: Sequence[int] | None = None,
        kernels: Kernels | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.parts = frozenset(parts)
        self.kernels = kernels or TorchKernels()
        if "embed" in parts:
            # Its weight given, not drawn: a random init on the meta device (how models are built to be
            # loaded) goes through torch's reference ops and imports its compiler stack.
            self.embed_tokens = nn.Embedding(
                config.vocab_size, config.hidden_size, _weight=torch.empty(config.vocab_size, config.hidden_size)
            )
        self.layers = nn.ModuleList(
            DecoderLayer(config, parts, experts, self.kernels) for _ in range(config.num_layers)
        )
        if "head" in parts:
            self.norm = RMSNorm(config.hidden_size, config.norm_eps, self.kernels)
            self.lm_head = Linear(config.hidden_size, config.vocab_size, self.kernels)

    def decoder_layers(self) -> list[DecoderLayer]:
        return list(self.layers)  # type: ignore[arg-type]  # ModuleList is typed as holding Modules

    def expert_ffns(self) -> list[ExpertFFN]:
        """Every layer's experts (an expert group's weights)."""
        ffns = [layer.block_sparse_moe.experts for layer in self.decoder_layers()]
        assert all(f is not None for f in ffns), "this model holds no experts"
        return ffns  # type: ignore[return-value]

    def prepare(
        self, positions: torch.Tensor, seq_lens: Sequence[int], cache: CacheBatch | None
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionPlan]:
        """Per-call tables every layer shares: rotary cos/sin [T, D] and the attention plan, on the
        model's device. The plan is built on the host: pass `positions` on the CPU (as `pack` does)
        and nothing here reads the device back."""
        weight = self.embed_tokens.weight
        host = positions.cpu()
        plan = plan_attention(
            host,
            seq_lens,
            self.config.sliding_window,
            None if cache is None else cache.block_tables,
            0 if cache is None else cache.cache.block_size,
        )
        on_device = positions.to(weight.device, non_blocking=True)
        cos, sin = cos_sin(on_device, self.config.head_dim, self.config.rope_theta, weight.dtype)
        return cos, sin, plan.to(weight.device)

    def local_moe(
        self, expert_counts: torch.Tensor | None = None, count_weights: torch.Tensor | None = None
    ) -> MoEStep:
        """The MoE step of one process: each layer's own gate and experts. `expert_counts` [L, E],
        if given, accumulates the tokens routed to each expert per layer, each token counted
        `count_weights` [T] times (default once; a graph's padding rows count 0)."""
        layers = self.decoder_layers()

        def step(i: int, x: torch.Tensor) -> torch.Tensor:
            counts = None if expert_counts is None else expert_counts[i]
            return layers[i].block_sparse_moe(x, counts, count_weights=count_weights)

        return step

    def hidden_states(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        seq_lens: Sequence[int],
        cache: CacheBatch | None = None,
        moe: MoEStep | None = None,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """tokens, positions [T] -> final-normed hidden states [T, H], or [R, H] of `rows` [R] only.

        The one layer loop: every layer's attention half here, its MoE half through `moe`
        (default: this model's own, `local_moe()`)."""
        if tokens.shape != positions.shape or tokens.dim() != 1:
            raise ValueError(f"tokens {tuple(tokens.shape)} and positions {tuple(positions.shape)} must be equal 1-D")
        cos, sin, plan = self.prepare(positions, seq_lens, cache)
        return self.layer_loop(tokens, cos, sin, plan, cache, moe or self.local_moe(), rows)

    def layer_loop(
        self,
        tokens: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        plan: AttentionPlan,
        cache: CacheBatch | None,
        moe: MoEStep,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The layers over tables already `prepare`d (a CUDA graph's step brings its own):
        tokens [T] -> final-normed hidden states [T, H] (or [R, H] of `rows`)."""
        h = self.embed_tokens(tokens)  # [T, H]
        for i, layer in enumerate(self.decoder_layers()):
            x, moe_input = layer.attention_block(h, cos, sin, plan, None if cache is None else cache.layer(i))
            h = x + moe(i, moe_input)  # [T, H]
        return self.norm(h if rows is None else h[rows])

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        seq_lens: Sequence[int],
        cache: CacheBatch | None = None,
        logit_rows: torch.Tensor | None = None,
        expert_counts: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [T, V] for packed sequences, or [R, V] for the rows `logit_rows` [R] only
        (e.g. each sequence's last token when generating, to skip most of the lm_head).

        `expert_counts` [L, E], if given, accumulates the tokens routed to each expert per layer."""
        if self.parts != ALL_PARTS:
            raise RuntimeError(f"a partial model ({sorted(self.parts)}) cannot run a whole forward")
        h = self.hidden_states(tokens, positions, seq_lens, cache, self.local_moe(expert_counts), logit_rows)
        return self.lm_head(h)  # [R, H] -> [R, V]
