"""Joining a Ray cluster, or starting a local one: the only place that calls `ray.init`, and the
one that turns token authentication's refusal into the fix."""

from __future__ import annotations

import logging
import os

import ray
from ray.exceptions import AuthenticationError


class RayRefused(ConnectionError):
    """The Ray cluster refused this process (token authentication)."""


def connect_ray(address: str) -> None:
    """Join the Ray cluster at `address`; `RayRefused` naming the fix when its token authentication
    turns this process away (Ray retries for ~20 s first, then says so)."""
    try:
        ray.init(address=address, logging_level=logging.WARNING)
    except ConnectionError as e:
        if not _refused_for_auth(e):
            raise
        mode = os.environ.get("RAY_AUTH_MODE")
        why = "sent a token it does not accept" if mode == "token" else f"has RAY_AUTH_MODE={mode or '(unset)'}"
        raise RayRefused(
            f"the Ray cluster at {address} refused this process: it runs with token authentication and this "
            f"process {why}. "
            "Set RAY_AUTH_MODE=token and the cluster's token (RAY_AUTH_TOKEN, or the file ~/.ray/auth_token; "
            "`ray get-auth-token` on the head prints it) on every node and driver."
        ) from e


def _refused_for_auth(e: BaseException | None) -> bool:
    """Whether a failure to connect was token authentication turning this process away."""
    seen = 0
    while e is not None and seen < 10:
        if isinstance(e, AuthenticationError) or "InvalidAuthToken" in str(e):
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False


def ensure_ray(address: str | None, cpus_needed: float) -> None:
    """Connect to `address`, or start a local Ray instance big enough for the plan's CPU slots."""
    if ray.is_initialized():
        return
    if address is None:
        # Local mode: logical CPU slots may exceed the cores (it is for correctness, not speed).
        cpus = max(os.cpu_count() or 1, int(cpus_needed) + 2)
        ray.init(address="local", num_cpus=cpus, include_dashboard=False, logging_level=logging.WARNING)
    else:
        connect_ray(address)


def available_nodes() -> list[dict[str, float]]:
    """Resources of each alive node (totals: a fresh placement group competes for them)."""
    return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]  # type: ignore[no-untyped-call]


def node_ip() -> str:
    """This process's node's IP, as Ray knows it."""
    return str(ray.util.get_node_ip_address())  # type: ignore[no-untyped-call]
