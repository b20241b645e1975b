"""The Ray backend tier: where a copy's workers go (`placement`, pure) and the `RayBackend` that
starts and steps them (`ray_backend`). Below the serving tier, above the engine's."""
