"""The backend tier: where a copy runs. `open_backend` picks it from the config: `LocalBackend`
(the model in the engine's process) or `ray_backend.RayBackend` (workers as Ray actors), placed by
`placement`'s pure functions. Below the serving tier, above the engine's."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # this package's modules import what they run on; importing one imports no other
    from cluster.engine.backend import Backend
    from model.config import ModelConfig
    from protocol.config import LLMConfig


def open_backend(
    config: LLMConfig,
    model: ModelConfig,
    checkpoint: Path,
    num_blocks: int,
    ray_address: str | None = None,
    placement: Any = None,
    bundle_offset: int = 0,
) -> Callable[[], Backend]:
    """The copy's backend, as a call for the thread that will own the engine: on Ray the workers
    start here (each loads in its own process) and the call hands them over; in one process the call
    loads the model on that thread, so one thread does all of its tensor work.
    `ray_address`, `placement` and `bundle_offset`: where Ray workers start (`RayBackend`)."""
    if config.cluster.single_process:
        from cluster.backend.local_backend import LocalBackend

        return lambda: LocalBackend.load(checkpoint, config, num_blocks)
    from cluster.backend.placement import worker_setup
    from cluster.backend.ray_backend import RayBackend  # Ray is only needed for the distributed path

    started = RayBackend(worker_setup(config, model, num_blocks), ray_address, placement, bundle_offset)
    return lambda: started
