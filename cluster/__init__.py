"""Engine, scheduler, KV block manager, placement, Serve app, gRPC and CLI.

Empty until the engine and serving issues land them; see ../shared/DESIGN.md.
"""
