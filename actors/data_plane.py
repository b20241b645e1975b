"""A worker's end of the data plane: the `torch.distributed` process group among a copy's workers.

Shape legend: P = members of the router + expert-group sub-group.

Two transports, the same calls (`cluster.transport`):

    nccl   one rank per GPU (NCCL refuses two ranks on one device); device tensors go as they are
    gloo   CPU tensors; and CUDA tensors of workers that share a GPU (a whole copy on one GPU):
           gloo's all_to_all_single takes them as they are, but its send/recv of a CUDA tensor
           crashes the process, so point-to-point tensors are staged through pinned host memory

Point-to-point traffic is posted as one batch (`batch_isend_irecv`) per hop, so a router receives
from all its shards at once. Nothing here synchronises the host with the device except what a
transport needs (gloo's staging copies) and the caller's split sizes (`actors/dispatch.py`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from collections.abc import Iterator, Sequence
from datetime import timedelta
from typing import Any

import psutil
import torch
import torch.distributed as dist

from protocol.config import Transport

logger = logging.getLogger(__name__)


def interface_of(ip: str) -> str | None:
    """The name of this machine's network interface that carries IPv4 address `ip`, if any."""
    for name, addresses in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address == ip for a in addresses):
            return name
    return None


def bind_interface(interface: str) -> None:
    """Make gloo and NCCL's bootstrap bind `interface`. Both read their interface only from these
    variables, when a group is formed; without them gloo binds what the hostname resolves to, which
    is loopback on a stock Ubuntu image (127.0.1.1), and peers on other hosts cannot connect."""
    os.environ["GLOO_SOCKET_IFNAME"] = interface
    os.environ["NCCL_SOCKET_IFNAME"] = interface


class DataPlaneBroken(RuntimeError):
    """A collective or point-to-point call failed: a peer died, or tore its group down after its own
    failure. The worker tears its group down too, so that peers blocked on it fail as well; the
    engine side then replaces the dead worker and forms a new group (`RayBackend`)."""


class DataPlane:
    def __init__(self, transport: Transport, device: torch.device, moe_group: Any) -> None:
        self.transport = transport
        self.device = device
        self.moe_group = moe_group  # routers + expert groups, for the all-to-all
        self.staged = transport == "gloo" and device.type == "cuda"

    @classmethod
    def join(
        cls,
        transport: Transport,
        device: torch.device,
        master_addr: str,
        master_port: int,
        rank: int,
        world_size: int,
        moe_ranks: list[int],
        timeout_s: float,
    ) -> DataPlane:
        """Form the world group and the router + expert-group sub-group; every rank calls it. `timeout_s`
        bounds every call on them, the rendezvous included: a peer silent that long is taken as lost."""
        options: dict[str, Any] = {}
        if transport == "nccl":
            torch.cuda.set_device(device)  # NCCL's batched p2p hangs without a current device
            options["device_id"] = device  # and binds the communicator to it up front
        timeout = timedelta(seconds=timeout_s)
        dist.init_process_group(
            transport, init_method=f"tcp://{master_addr}:{master_port}", rank=rank, world_size=world_size,
            timeout=timeout, **options,
        )  # fmt: skip
        moe_group = dist.new_group(moe_ranks, timeout=timeout)  # a sub-group does not inherit it (30 min)
        # Batched p2p as the first call on a group needs every rank in it: one barrier first.
        dist.barrier(device_ids=[device.index or 0] if transport == "nccl" else None)
        return cls(transport, device, moe_group)

    def send_recv(
        self, sends: Sequence[tuple[int, torch.Tensor]] = (), recvs: Sequence[tuple[int, torch.Tensor]] = ()
    ) -> None:
        """Send each (peer rank, tensor) of `sends` and fill each of `recvs`, all posted at once."""
        with _broken_if_failed("point-to-point"):
            self._send_recv(sends, recvs)

    def _send_recv(self, sends: Sequence[tuple[int, torch.Tensor]], recvs: Sequence[tuple[int, torch.Tensor]]) -> None:
        if not sends and not recvs:
            return
        if self.staged:
            sends = [(peer, _to_host(t)) for peer, t in sends]
            landing = [(peer, t, _pinned_like(t)) for peer, t in recvs]
            recvs = [(peer, host) for peer, _, host in landing]
        ops = [dist.P2POp(dist.isend, t.contiguous(), peer) for peer, t in sends]
        ops += [dist.P2POp(dist.irecv, t, peer) for peer, t in recvs]
        for work in dist.batch_isend_irecv(ops):
            work.wait()
        if self.staged:
            for _, target, host in landing:
                target.copy_(host)  # synchronous: the pinned buffer is free again when this returns

    def all_to_all(
        self, output: torch.Tensor, input: torch.Tensor, output_splits: list[int], input_splits: list[int]
    ) -> None:
        """`all_to_all_single` in the router + expert-group sub-group (rows per member, P each)."""
        with _broken_if_failed("all-to-all"):
            dist.all_to_all_single(output, input, output_splits, input_splits, group=self.moe_group)

    def all_to_all_counts(self, output: torch.Tensor, input: torch.Tensor) -> None:
        """The [P] split sizes every member sends every other, exchanged before the rows."""
        with _broken_if_failed("all-to-all"):
            dist.all_to_all_single(output, input, group=self.moe_group)

    def exchange_round_s(self, rounds: int = 8) -> float:
        """Seconds of one all-to-all of split sizes in the sub-group, the least of `rounds` (every
        member calls it together): what a message of the exchange costs beside its rows."""
        p = dist.get_world_size(self.moe_group)
        sizes = torch.zeros(p, dtype=torch.long, device=self.device)
        best = float("inf")
        for _ in range(rounds):
            start = time.perf_counter()
            self.all_to_all_counts(torch.empty_like(sizes), sizes)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            best = min(best, time.perf_counter() - start)
        return best

    def abort(self) -> None:
        """Tear the groups down: their connections close, so peers waiting on this worker fail at once
        instead of at the group's timeout."""
        if dist.is_initialized():
            dist.destroy_process_group()

    @property
    def backend(self) -> str:
        return str(dist.get_backend())

    @property
    def timeout_s(self) -> float:
        """Every call's deadline, read back from the process groups this worker is in (the longest)."""
        device = self.device if self.transport == "nccl" else torch.device("cpu")
        groups = [dist.distributed_c10d._get_default_group(), self.moe_group]
        return max(float(g._get_backend(device).options._timeout.total_seconds())
                   for g in groups if isinstance(g, dist.ProcessGroup))  # fmt: skip


def _to_host(t: torch.Tensor) -> torch.Tensor:
    host = _pinned_like(t)
    host.copy_(t)  # waits for the device: the tensor must be complete before gloo reads it
    return host


def _pinned_like(t: torch.Tensor) -> torch.Tensor:
    return torch.empty(t.shape, dtype=t.dtype, pin_memory=True)


@contextlib.contextmanager
def _broken_if_failed(what: str) -> Iterator[None]:
    try:
        yield
    except Exception as e:  # gloo: RuntimeError from its transport; NCCL: DistBackendError
        raise DataPlaneBroken(f"the data plane's {what} failed: {str(e).splitlines()[0][:200]}") from e
