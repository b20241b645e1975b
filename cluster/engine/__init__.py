"""The engine tier: requests in, tokens and text out, one step at a time (`core.Engine`), with
its scheduler and KV blocks, outputs, structured outputs and the experts' load. It knows a
backend only by the `core.Backend` protocol: nothing here imports Ray or the serving tier."""
