"""Ray actor classes of one model copy (AttentionShard, Router, ExpertGroup): thin shells over `model/`.

Empty until the engine issue lands them; see ../shared/DESIGN.md for their roles.
"""
