"""Hosts for tests: network namespaces on a bridge, each its own machine as far as the network goes.

Each host has its own IPv4 address on a private /24 that only these namespaces use (the bridge
has no address in the test's own namespace, and no host has a route out: nothing outside this
machine is ever addressed), its own loopback, an Ubuntu-style `/etc/hosts` (`ip netns exec`
bind-mounts `/etc/netns/<name>/hosts`) in which the machine's hostname resolves to 127.0.1.1,
the trap that makes gloo bind loopback, and its own directory for Ray's files. Ray runs on them
as a user runs it: `ray start --head` on one, `ray start --address` on the others (all at once),
token authentication on.

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
from concurrent.futures import ThreadPoolExecutor
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


def namespace_pids(name: str) -> list[int]:
    """The processes of a host (its network namespace), by pid."""
    return [int(p) for p in _ip("netns", "pids", name, check=False).stdout.split()]


def kill_namespace(name: str) -> int:
    """Kill every process of a host at once (a machine that loses power); how many there were."""
    pids = namespace_pids(name)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return len(pids)


# PID 1 of an SSH host's namespaces: gives the host its own /root (with this Python's install mounted
# back; its own Ray temp directory it has from `Host.command`), starts sshd, reaps the orphans Ray's
# daemons leave, and ends with sshd.
_HOST_INIT = """
import json, os, subprocess, sys
spec = json.loads(sys.argv[1])
mount = lambda src, dst: subprocess.run(["mount", "--bind", src, dst], check=True)
mount("/root", spec["real"])
mount(spec["home"], "/root")
for name in spec["keep"]:
    os.makedirs("/root/" + name, exist_ok=True)
    mount(spec["real"] + "/" + name, "/root/" + name)
sshd = subprocess.Popen(spec["sshd"])
while os.wait()[0] != sshd.pid:
    pass
"""


@dataclass
class Host:
    name: str  # the namespace's name
    ip: str
    hostname: str  # what its /etc/hosts maps to 127.0.1.1
    temp_dir: str  # its own temporary directory: Ray's sessions, sockets and last-cluster file live there
    ray_tmp: str  # the one path every host's RAY_TMPDIR names, its own temp_dir mounted there

    def command(self, argv: Sequence[str], env: Mapping[str, str | None] | None = None) -> list[str]:
        """`argv` run inside this host, with `env` added to the environment. RAY_TMPDIR keeps the
        host's Ray files apart, as on a machine of its own: without it every host, and every other
        Ray on this machine, would share /tmp/ray (`ray start` leaves the address of the cluster it
        joined there, where a later `ray.init()` anywhere on the machine would find it). It names
        one path on every host, with the host's own directory mounted there (in the mount namespace
        `ip netns exec` gives the command): Ray's nodes take the head's session directory path,
        which on real machines names a directory on each machine's own disk, and which here would
        otherwise be the head's, shared by every node (log and socket names raced on when nodes
        join at once)."""
        given = {"RAY_TMPDIR": self.ray_tmp} | dict(env or {})  # a None value unsets the variable
        extra = [f"{k}={v}" for k, v in given.items() if v is not None]
        unset = [arg for k, v in given.items() if v is None for arg in ("-u", k)]
        own_tmp = ["sh", "-c", 'mount --bind "$1" "$2" && shift 2 && exec "$@"', "sh", self.temp_dir, self.ray_tmp]
        return ["ip", "netns", "exec", self.name, *own_tmp, "env", *unset, *extra, *argv]

    def pids(self) -> list[int]:
        return namespace_pids(self.name)


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
        Path(self.ray_tmp).mkdir(parents=True, exist_ok=True)
        for i in range(self.n):
            host = Host(
                f"mx{self.tag}h{i}", f"{subnet}.{i + 1}", f"host{i}", f"/tmp/mxray-{self.tag}-{i}", self.ray_tmp
            )
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
        """`ray start --head` on host 0 with `cpus[0]` CPUs, then every other host joins it (all at
        once) with its `cpus[i]` and `resources[i]` (JSON); `system_config` goes to the head (e.g.
        faster failure detection)."""
        head = self.hosts[0]
        extra = [f"--system-config={json.dumps(system_config)}"] if system_config else []
        self.run(head, [RAY, "start", "--head", f"--node-ip-address={head.ip}", f"--port={RAY_PORT}",
                        f"--num-cpus={cpus[0]}", "--include-dashboard=false", "--disable-usage-stats",
                        *extra])  # fmt: skip
        nodes = self.hosts[1:]
        joins = [self.join_argv(h, cpus[i], resources[i] if i < len(resources) else None)
                 for i, h in enumerate(nodes, start=1)]  # fmt: skip
        with ThreadPoolExecutor(max(1, len(nodes))) as pool:  # all at once, as a cluster's machines boot
            list(pool.map(self.run, nodes, joins))

    def join_argv(self, host: Host, cpus: int, resources: str | None = None) -> list[str]:
        """`ray start` joining `host` to the head, as its node set-up (or a supervisor restarting it) runs it."""
        extra = [f"--resources={resources}"] if resources else []
        return [RAY, "start", f"--address={self.head_address}", f"--node-ip-address={host.ip}", f"--num-cpus={cpus}",
                *extra, "--disable-usage-stats"]  # fmt: skip

    def host_argv(self, host: Host, argv: Sequence[str]) -> list[str]:
        """The whole command line that runs `argv` on `host` with the cluster's Ray environment, for a
        process that is not the test's (a driver restoring a host it broke)."""
        return host.command(argv, self.ray_env)

    # ---- machines reached over SSH (the cluster launcher's way) --------------------------------

    @property
    def ssh_dir(self) -> Path:
        return Path(f"/tmp/mxssh-{self.tag}")

    @property
    def ssh_key(self) -> Path:
        """The private key every host's sshd accepts (for root)."""
        return self.ssh_dir / "id_ed25519"

    @property
    def ray_tmp(self) -> str:
        """RAY_TMPDIR on every host: one path, each host's own directory behind it (`Host.command`)."""
        return f"/tmp/mxray-{self.tag}"

    def home(self, host: Host) -> Path:
        """The host's own /root: what its processes see there (~/.ray, ~/ray_bootstrap_*, ~/.bashrc)."""
        return Path(host.temp_dir) / "root"

    def start_sshd(self, env: Mapping[str, str] | None = None, shared: Sequence[str] = ()) -> None:
        """sshd on every host (port 22 of its address; key authentication only, for root), each in PID
        and mount namespaces of its own as well, so that it is a machine in these ways too: `ray stop`
        in a session there (the cluster launcher runs it) sees and ends that host's processes only,
        never other Rays on this machine, and /root is the host's own (`home`; this Python's install
        is mounted back into it where it lives under /root), so that nothing a session writes to ~
        reaches this machine's. Sessions get this Python environment first on PATH, as a machine with
        the project installed, and `env`. `shared`: directories of this machine's /root that every
        host sees as its own at the same path (what machines made from one image have alike)."""
        sshd = shutil.which("sshd", path="/usr/sbin:/usr/bin")
        if sshd is None:
            raise RuntimeError("sshd is missing: apt-get install openssh-server")
        self.ssh_dir.mkdir(parents=True, exist_ok=True)
        Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # sshd's privilege-separation directory
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.ssh_key)], check=True)
        (self.ssh_dir / "authorized_keys").write_text(self.ssh_key.with_suffix(".pub").read_text())
        bin_dir = Path(sys.executable).parent
        keep = sorted({Path(p).relative_to("/root").parts[0] for p in (sys.base_prefix, sys.prefix,
                       os.path.realpath(sys.executable)) if Path(p).is_relative_to("/root")})  # fmt: skip
        keep += [str(Path(p).relative_to("/root")) for p in shared if Path(p).is_relative_to("/root")]
        for i, host in enumerate(self.hosts):
            home = self.home(host)
            home.mkdir(parents=True, exist_ok=True)
            (home / ".profile").write_text(f'export PATH="{bin_dir}:$PATH"\n[ -f ~/.bashrc ] && . ~/.bashrc\n')
            key = self.ssh_dir / f"host_key_{i}"
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
            path = f"{bin_dir}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
            session = {"PATH": path, "RAY_TMPDIR": self.ray_tmp, "RAY_USAGE_STATS_ENABLED": "0"} | dict(env or {})
            config = self.ssh_dir / f"sshd_config_{i}"
            config.write_text(
                f"ListenAddress {host.ip}\nPort 22\nHostKey {key}\nPidFile {self.ssh_dir}/sshd_{i}.pid\n"
                f"AuthorizedKeysFile {self.ssh_dir}/authorized_keys\nPermitRootLogin prohibit-password\n"
                "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
                f"SetEnv {' '.join(f'{k}={v}' for k, v in session.items())}\n"
            )
            real = self.ssh_dir / f"real_root_{i}"  # where the machine's /root stays reachable, for `keep`
            real.mkdir()
            spec = json.dumps({"home": str(home), "real": str(real), "keep": keep,
                               "sshd": [sshd, "-D", "-e", "-f", str(config)]})  # fmt: skip
            argv = ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c", _HOST_INIT, spec]
            self.start(host, argv, log=self.ssh_dir / f"sshd_{i}.log")
        for host in self.hosts:
            self.wait_ssh(host)

    def ssh_argv(self, host: Host, command: str) -> list[str]:
        """`ssh root@host command` with the harness's key (to run on a host: `run(other, ssh_argv(...))`)."""
        return ["ssh", "-i", str(self.ssh_key), "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                "-o", "LogLevel=ERROR", "-o", "BatchMode=yes", f"root@{host.ip}", command]  # fmt: skip

    def wait_ssh(self, host: Host, timeout_s: float = 20) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            r = self.run(self.hosts[0], self.ssh_argv(host, "true"), timeout_s=timeout_s, check=False)
            if r.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"sshd on {host.name} did not answer: {r.stderr}")
            time.sleep(0.3)

    def kill(self, host: Host) -> None:
        """The host crashes: every process in it is killed at once."""
        kill_namespace(host.name)

    @staticmethod
    def link_argv(host: Host, up: bool) -> list[str]:
        """Set the host's network interface down (or up again): a network partition. It works from any
        namespace, so a driver on another host can run it."""
        return ["ip", "-n", host.name, "link", "set", "eth0", "up" if up else "down"]

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
        shutil.rmtree(self.ssh_dir, ignore_errors=True)
        shutil.rmtree(self.ray_tmp, ignore_errors=True)
