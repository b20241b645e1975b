"""The serving tier: the Ray Serve app (`app`), its config (`config`), the ingress (HTTP, SSE,
gRPC), the `LLMServer` deployment, the OpenAI protocol, tool calls and metrics."""
