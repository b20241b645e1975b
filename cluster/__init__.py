"""The engine side of a model copy: the public `LLM` API, engine, scheduler, KV block manager,
placement, the Ray backend that starts and steps the worker actors, the Serve app (ingress and
`LLMServer`), gRPC and the `mixtral-cluster` CLI. See ../shared/DESIGN.md.
"""

from cluster.engine.core import EngineError
from cluster.engine.request import RequestOutput, SamplingParams
from cluster.llm import LLM

__all__ = ["LLM", "EngineError", "RequestOutput", "SamplingParams"]
