"""What the engine and the workers share, below both: the config a copy is built from
(`protocol.config`), each worker's spec and setup (`protocol.worker`), and the per-step messages
(`protocol.step`). Imports `model/` only; `actors/` and `cluster/` import it.
"""
