"""Hosts for tests: network namespaces on a bridge, each its own machine as far as the network goes.

Each host has its own IPv4 address on a private /24 that only these namespaces use (the bridge
has no address in the test's own namespace, and no host has a route out: nothing outside this
machine is ever addressed), its own loopback, and an Ubuntu-style `/etc/hosts` (`ip netns exec`
bind-mounts `/etc/netns/<name>/hosts`) in which the machine's hostname resolves to 127.0.1.1,
the trap that makes gloo bind loopback. Ray runs on them as a user runs it: `ray start --head`
on one, `ray start --address` on the others, token authentication on.

Teardown kills only the processes of its own namespaces, by pid (`ip netns pids`), never with
`ray stop` or `pkill` (which would end every Ray on the machine, other tests' included).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

RAY = str(Path(sys.executable).parent / "ray")
RAY_PORT = 6379


def unavailable() -> str | None:
    """Why hosts cannot be made here (None when they can): they need root and iproute2."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "network namespaces need the ip command (iproute2)"
    return None


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True)


@dataclass
class Host:
    name: str  # the namespace's name
    ip: str
    hostname: str  # what its /etc/hosts maps to 127.0.1.1
    temp_dir: str  # its own temporary directory: Ray's sessions, sockets and last-cluster file live there

    def command(self, argv: Sequence[str], env: Mapping[str, str | None] | None = None) -> list[str]:
        """`argv` run inside this host, with `env` added to the environment. RAY_TMPDIR keeps the
        host's Ray files apart, as on a machine of its own: without it every host, and every other
        Ray on this machine, would share /tmp/ray (`ray start` leaves the address of the cluster it
        joined there, where a later `ray.init()` anywhere on the machine would find it)."""
        given = {"RAY_TMPDIR": self.temp_dir} | dict(env or {})  # a None value unsets the variable
        extra = [f"{k}={v}" for k, v in given.items() if v is not None]
        unset = [arg for k, v in given.items() if v is None for arg in ("-u", k)]
        return ["ip", "netns", "exec", self.name, "env", *unset, *extra, *argv]

    def pids(self) -> list[int]:
        out = _ip("netns", "pids", self.name, check=False).stdout
        return [int(p) for p in out.split()]


@dataclass
class Hosts:
    """`n` hosts on one bridge: `hosts[0]` is meant for Ray's head."""

    n: int
    tag: str = field(default_factory=lambda: secrets.token_hex(2))
    hosts: list[Host] = field(default_factory=list)
    token: str = field(default_factory=lambda: secrets.token_hex(16))  # the cluster's Ray auth token
    _procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def bridge(self) -> str:
        return f"mxbr{self.tag}"

    @property
    def ray_env(self) -> dict[str, str]:
        """What every node and driver of the cluster needs to be let in."""
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token, "RAY_USAGE_STATS_ENABLED": "0"}

    @property
    def head_address(self) -> str:
        return f"{self.hosts[0].ip}:{RAY_PORT}"

    def __enter__(self) -> Hosts:
        try:
            self._create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _create(self) -> None:
        subnet = f"10.{200 + int(self.tag[:2], 16) % 50}.{int(self.tag[2:], 16)}"  # 10.200-249.x: one per harness
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("link", "set", self.bridge, "up")
        machine = socket.gethostname()
        for i in range(self.n):
            host = Host(f"mx{self.tag}h{i}", f"{subnet}.{i + 1}", f"host{i}", f"/tmp/mxray-{self.tag}-{i}")
            Path(host.temp_dir).mkdir(parents=True, exist_ok=True)
            self.hosts.append(host)
            _ip("netns", "add", host.name)
            veth = f"mxv{self.tag}{i}"
            _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", host.name)
            _ip("link", "set", veth, "master", self.bridge, "up")
            _ip("-n", host.name, "addr", "add", f"{host.ip}/24", "dev", "eth0")
            _ip("-n", host.name, "link", "set", "eth0", "up")
            _ip("-n", host.name, "link", "set", "lo", "up")
        for host in self.hosts:  # Ubuntu's: the machine's own name on 127.0.1.1; the others by name
            etc = Path("/etc/netns") / host.name
            etc.mkdir(parents=True, exist_ok=True)
            others = "".join(f"{h.ip} {h.hostname}\n" for h in self.hosts if h is not host)
            (etc / "hosts").write_text(f"127.0.0.1 localhost\n127.0.1.1 {machine} {host.hostname}\n{others}")

    # ---- processes -----------------------------------------------------------------------------

    def run(self, host: Host, argv: Sequence[str], timeout_s: float = 120, env: Mapping[str, str | None] | None = None,
            check: bool = True) -> subprocess.CompletedProcess[str]:  # fmt: skip
        """Run `argv` on `host` to completion, with the cluster's Ray environment."""
        r = subprocess.run(host.command(argv, self.ray_env | dict(env or {})), capture_output=True, text=True,
                           timeout=timeout_s)  # fmt: skip
        if check and r.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} on {host.name} exited {r.returncode}:\n{r.stdout}\n{r.stderr}")
        return r

    def start(self, host: Host, argv: Sequence[str], env: Mapping[str, str] | None = None,
              log: Path | None = None) -> subprocess.Popen[bytes]:  # fmt: skip
        """Start `argv` on `host` in the background (ended at teardown with the host's other processes)."""
        out = open(log, "wb") if log is not None else subprocess.DEVNULL  # the child holds it
        argv = host.command(argv, self.ray_env | dict(env or {}))
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
        self._procs.append(proc)
        return proc

    def start_ray(
        self, cpus: Sequence[int], resources: Sequence[str | None] = (), system_config: dict[str, Any] | None = None
    ) -> None:
        """`ray start --head` on host 0 with `cpus[0]` CPUs, then every other host joins it with its
        `cpus[i]` and `resources[i]` (JSON); `system_config` goes to the head (e.g. faster failure
        detection)."""
        head = self.hosts[0]
        common = ["--disable-usage-stats"]
        extra = [f"--system-config={json.dumps(system_config)}"] if system_config else []
        self.run(head, [RAY, "start", "--head", f"--node-ip-address={head.ip}", f"--port={RAY_PORT}",
                        f"--num-cpus={cpus[0]}", "--include-dashboard=false", *extra, *common])  # fmt: skip
        for i, host in enumerate(self.hosts[1:], start=1):
            extra = [f"--resources={resources[i]}"] if i < len(resources) and resources[i] else []
            self.run(host, [RAY, "start", f"--address={self.head_address}", f"--node-ip-address={host.ip}",
                            f"--num-cpus={cpus[i]}", *extra, *common])  # fmt: skip

    def kill(self, host: Host) -> None:
        """The host crashes: every process in it is killed at once."""
        for pid in host.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def link(self, host: Host, up: bool) -> None:
        """Cut (or restore) the host's link to the bridge: a network partition."""
        _ip("link", "set", f"mxv{self.tag}{self.hosts.index(host)}", "up" if up else "down")

    def close(self) -> None:
        for host in self.hosts:
            self.kill(host)
        deadline = time.monotonic() + 10
        while any(h.pids() for h in self.hosts) and time.monotonic() < deadline:
            time.sleep(0.2)
        for proc in self._procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                logger.warning("process %d outlived its host", proc.pid)
        for i, host in enumerate(self.hosts):
            _ip("link", "del", f"mxv{self.tag}{i}", check=False)
            _ip("netns", "del", host.name, check=False)
            shutil.rmtree(Path("/etc/netns") / host.name, ignore_errors=True)
            shutil.rmtree(host.temp_dir, ignore_errors=True)
        _ip("link", "del", self.bridge, check=False)
