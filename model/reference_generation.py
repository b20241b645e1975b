"""Reference generation in one process: packed prefill of every prompt, then batched decode.

The baseline later tests compare the engines against. Each sequence gets contiguous blocks of
a paged cache big enough for its whole generation; no scheduling, no preemption.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from model.kv_cache import CacheBatch, KVCache
from model.mixtral import Mixtral
from model.sampling import DrawParams, adjust, make_generator, sample


@torch.inference_mode()
def generate(
    model: Mixtral,
    prompts: Sequence[Sequence[int]],
    params: DrawParams,
    max_tokens: int = 16,
    eos_id: int | None = 2,
    block_size: int = 16,
) -> list[list[int]]:
    """New token ids for each prompt (stopping at `eos_id`, which is kept, or `max_tokens`)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt, and every prompt needs at least one token")
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be at least 1, not {max_tokens}")
    device = model.embed_tokens.weight.device
    dtype = model.embed_tokens.weight.dtype
    blocks_per_seq = [math.ceil((len(p) + max_tokens) / block_size) for p in prompts]
    cache = KVCache.allocate(model.config, sum(blocks_per_seq), block_size, dtype, device)
    starts = [sum(blocks_per_seq[:i]) for i in range(len(prompts))]
    tables = [list(range(s, s + n)) for s, n in zip(starts, blocks_per_seq, strict=True)]
    generators = [make_generator(params.seed, device) for _ in prompts]  # the seed is per request

    outputs: list[list[int]] = [[] for _ in prompts]
    active = list(range(len(prompts)))
    tokens = [list(p) for p in prompts]  # what each active sequence feeds next
    positions = [list(range(len(p))) for p in prompts]
    while active:
        seq_lens = [len(tokens[i]) for i in active]
        flat_tokens = torch.tensor([t for i in active for t in tokens[i]], device=device)
        flat_pos = torch.tensor([p for i in active for p in positions[i]], device=device)
        last_rows = torch.tensor(seq_lens, device=device).cumsum(0) - 1
        batch = CacheBatch(cache, [tables[i] for i in active])
        logits = model(flat_tokens, flat_pos, seq_lens, batch, logit_rows=last_rows)  # [S, V]
        still = []
        for row, i in enumerate(active):
            draw = logits[row]  # [V]
            if params.adjusts:  # logit bias, banned ids, penalties over the prompt and the tokens so far
                draw = adjust(draw, params, outputs[i], prompts[i])
            tok = sample(draw, params, generators[i])
            outputs[i].append(tok)
            next_pos = positions[i][-1] + 1
            tokens[i], positions[i] = [tok], [next_pos]
            if tok != eos_id and len(outputs[i]) < max_tokens:
                still.append(i)
        active = still
    return outputs
