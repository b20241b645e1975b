"""The engine side of a model copy: the public `LLM` API, engine, scheduler, KV block manager,
placement, the Ray backend that starts and steps the worker actors, the Serve app (ingress and
`LLMServer`), gRPC and the `mixtral-cluster` CLI. See ../shared/DESIGN.md.
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cluster.engine.backend import EngineError
    from cluster.engine.request import RequestOutput, SamplingParams
    from cluster.llm import LLM

__all__ = ["LLM", "EngineError", "RequestOutput", "SamplingParams"]
_HOMES = {"LLM": "cluster.llm", "EngineError": "cluster.engine.backend", "RequestOutput": "cluster.engine.request",
          "SamplingParams": "cluster.engine.request"}  # fmt: skip


def __getattr__(name: str) -> Any:
    """The public names on first use. Processes that import only a part of this package (Serve's
    proxy for the gRPC servicer, workers unpickling a Serve config) would otherwise pay for
    everything `LLM` imports: torch, the tokenizer, the grammar engine (seconds of CPU each)."""
    if name in _HOMES:
        import importlib

        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'cluster' has no attribute {name!r}")
