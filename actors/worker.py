"""What every worker actor shares: loading its own tensors, joining the data plane, reporting."""

from __future__ import annotations

import abc
import logging
import os
import socket
from typing import Any

import ray
import torch

from actors.data_plane import DataPlane, bind_interface, interface_of
from actors.profiling import PhaseClock
from model.checkpoint import Checkpoint
from model.kernels import select_kernels
from model.loader import load_into
from model.mixtral import Mixtral
from protocol.step import StepMessage
from protocol.worker import WorkerSetup, WorkerSpec

logger = logging.getLogger(__name__)


def rss_bytes() -> int:
    """This process's resident memory now (Linux), else its peak."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def free_address() -> tuple[str, int]:
    """This node's IP and a free TCP port, for a process group's rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        port = int(s.getsockname()[1])
    return ray.util.get_node_ip_address(), port  # type: ignore[no-untyped-call]


class Worker(abc.ABC):
    """Base of AttentionShard, Router and ExpertGroup: holds `Mixtral(config, spec.parts, spec.experts)`
    on the kernels the config chooses for its device and dtype."""

    def __init__(self, spec: WorkerSpec, setup: WorkerSetup) -> None:
        cfg = setup.config
        torch.set_num_threads(cfg.cluster.torch_threads)  # fixed, so workers sharing cores do not oversubscribe
        self.spec = spec
        self.setup = setup
        self.config = setup.model
        self.dtype = cfg.dtype
        self.device = torch.device("cuda", 0) if cfg.cluster.device == "cuda" else torch.device("cpu")  # Ray sets it
        ckpt = Checkpoint(cfg.model.checkpoint)
        kernels = select_kernels(cfg.engine.kernels, self.device, self.dtype)
        with torch.device("meta"):
            self.model = Mixtral(self.config, spec.parts, list(spec.experts) or None, kernels)
        slot = {e: i for i, e in enumerate(spec.experts)}
        load_into(
            self.model,
            ckpt,
            spec.weight_names(self.config),
            device=self.device,
            dtype=self.dtype,
            expert_slot=slot.__getitem__ if slot else lambda e: e,
        )
        self.keys_read = list(ckpt.keys_read)
        self.plane: DataPlane | None = None  # formed by `join`
        self.interface: str | None = None  # the network interface the data plane binds (`join`)
        self.clock = PhaseClock(self.device)
        logger.info("%s loaded %d tensors", spec.name, len(self.keys_read))

    # ---- set-up and reports (control plane) ------------------------------------------------

    def address(self) -> tuple[str, int]:
        """This node's IP and a free TCP port for the process group's rendezvous (asked of rank 0)."""
        return free_address()

    def join(self, master_addr: str, master_port: int) -> float | None:
        """Form the data plane: the world group, and the router + expert-group sub-group (every rank
        calls it). A worker that had one (a survivor of a lost worker) leaves it first. Members of the
        sub-group then time its all-to-all together (`DataPlane.exchange_round_s`) and return it."""
        if self.plane is not None:
            self.plane.abort()
        cfg = self.setup.config
        world = cfg.cluster.attention_shards + cfg.cluster.routers + cfg.cluster.expert_groups
        node_ip = ray.util.get_node_ip_address()  # type: ignore[no-untyped-call]
        interface = cfg.cluster.network_interface or interface_of(node_ip)
        if interface is None:
            raise RuntimeError(f"{self.spec.name}: no network interface of this node carries its Ray address "
                               f"{node_ip}; name one with cluster.network_interface")  # fmt: skip
        bind_interface(interface)
        self.interface = interface
        self.plane = DataPlane.join(
            cfg.cluster.data_plane, self.device, master_addr, master_port, self.spec.rank, world,
            self.setup.moe_ranks, cfg.cluster.data_plane_timeout_s,
        )  # fmt: skip
        return self.plane.exchange_round_s() if self.spec.rank in self.setup.moe_ranks else None

    @property
    def data_plane(self) -> DataPlane:
        assert self.plane is not None, "a step before the data plane was formed"
        return self.plane

    @torch.inference_mode()
    def step(self, message: StepMessage) -> Any:
        """One engine step (`run_step`). If it fails (a peer died and the data plane broke, or anything
        else), the data plane is torn down so the peers blocked on this worker fail at once too."""
        try:
            return self.run_step(message)
        except BaseException:
            if self.plane is not None:
                self.plane.abort()
                self.plane = None
            raise

    @abc.abstractmethod
    def run_step(self, message: Any) -> Any:
        """The role's part of one step (attention shard, router, expert group), from its message
        (`protocol.step.step_messages`)."""

    def where(self) -> dict[str, Any]:
        ctx = ray.get_runtime_context()
        return {
            "name": self.spec.name,
            "pid": os.getpid(),
            "rss_bytes": rss_bytes(),
            "node_id": ctx.get_node_id(),
            "node_ip": ray.util.get_node_ip_address(),  # type: ignore[no-untyped-call]
            "interface": self.interface,  # the data plane's, once formed
            "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
            "resources": ctx.get_assigned_resources(),  # type: ignore[no-untyped-call]
            "placement_group_id": ctx.get_placement_group_id(),
        }

    def loaded(self) -> dict[str, Any]:
        """Tensors read from the checkpoint and bytes of parameters held."""
        nbytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
        return {"keys_read": self.keys_read, "param_bytes": nbytes}

    def settings(self) -> dict[str, Any]:
        """What this worker runs with, read back from its own state (not from its config)."""
        param = next(self.model.parameters())
        return {
            "torch_threads": torch.get_num_threads(),
            "dtype": str(param.dtype).removeprefix("torch."),
            "device": param.device.type,
            "kernels": self.model.kernels.name,
            "transport": self.plane.backend if self.plane is not None else None,
            "data_plane_timeout_s": self.plane.timeout_s if self.plane is not None else None,
            "checkpoint": str(Checkpoint(self.setup.config.model.checkpoint).path),
        }

    def profile(self, on: bool) -> None:
        """Start (or stop) recording seconds per phase of each step."""
        self.clock.enabled = on
        self.clock.take()

    def step_times(self) -> list[dict[str, float]]:
        """One record per step since the last call: seconds per phase and `total`."""
        return self.clock.take()
