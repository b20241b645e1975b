"""Ray actor classes of one model copy: thin shells over `model/` code.

`AttentionShard` x A (embeddings, attention, KV cache, lm_head, sampling), `Router` x R (gates,
all-to-all dispatch), `ExpertGroup` x G (a subset of the experts). See ../shared/DESIGN.md.
Each is a plain class; `cluster.backend.ray_backend` wraps it with `ray.remote` and places it.
"""

from actors.attention_shard import AttentionShard
from actors.expert_group import ExpertGroup
from actors.router import Router

__all__ = ["AttentionShard", "ExpertGroup", "Router"]
