"""Engine, scheduler, KV block manager, placement and the public `LLM` API.

The Serve app, gRPC service and CLI land here with the serving issue; see ../shared/DESIGN.md.
"""

from cluster.engine import EngineError, RequestOutput, SamplingParams
from cluster.llm import LLM

__all__ = ["LLM", "EngineError", "RequestOutput", "SamplingParams"]
