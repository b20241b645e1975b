"""`ray up` for real, on premises: the repository's `ray_cluster.onprem.yaml` (Ray's `local` node
provider) run end to end against three namespace hosts (`tests/hosts/namespaces.py`) with sshd in each, as
against machines you already have. Only head_ip, worker_ips and auth are replaced by the hosts'.

`ray up -y` (run on the head, as on-premises users often do, its ~/.ray/auth_token made once) starts
the head over SSH and the head's autoscaler brings both nodes in over SSH, each after its set-up
commands (the token file mounted, the CPU kernels built); `mixtral-cluster serve CONFIG
--address <head>:6379` on the head brings the app up with the model's workers on the two nodes;
the openai client gets the reference answer through the head; `ray down -y` then leaves no
process behind on any host (the nodes' Ray exits once it loses the head: Ray's GCS reconnect
timeout, shortened here to 10 s).

Each SSH host runs in PID and mount namespaces of its own as well (`Hosts.start_sshd`): the
`ray stop` that the launcher runs over SSH ends that host's processes only, never another Ray on
this machine, and each host's /root is its own. Skipped without root,
iproute2, sshd or rsync (CI installs openssh-server and rsync)."""

from __future__ import annotations

import json
import logging
import shutil
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from model import ModelConfig
from model.kernels import compiled
from protocol.expert_cost import compiled_split
from tests.hosts.namespaces import Hosts, unavailable
from tests.support.common import random_prompts

ROOT = Path(__file__).resolve().parents[2]
TINY = ModelConfig.preset("tiny")
PROMPT = random_prompts(1, seed=31, low=4, high=20)[0]
MAX_TOKENS = 8
# On the head: the node IP of each of the copy's workers, as the serving copy reports them.
WHERE = (
    "import json, ray; from ray import serve; ray.init(address='auto', logging_level='ERROR'); "
    "h = serve.get_deployment_handle('LLMServer', app_name='mixtral'); "
    "print('WORKERS', json.dumps(sorted(w['node_ip'] for w in h.workers.remote().result())))"
)


def _missing() -> str | None:
    if (why := unavailable()) is not None:
        return why
    for tool, package in (("sshd", "openssh-server"), ("rsync", "rsync"), ("unshare", "util-linux")):
        if shutil.which(tool, path="/usr/sbin:/usr/bin:/sbin:/bin") is None:
            return f"{tool} is missing: apt-get install {package}"
    return None


pytestmark = [pytest.mark.hosts, pytest.mark.skipif(_missing() is not None, reason=_missing() or "")]


def _launcher_config(hosts: Hosts, path: Path) -> Path:
    """The repository's on-premises config with the hosts' addresses and the harness's SSH key."""
    cfg = yaml.safe_load((ROOT / "ray_cluster.onprem.yaml").read_text())
    head, *nodes = hosts.hosts
    cfg["cluster_name"] = f"mx-onprem-{hosts.tag}"
    cfg["provider"] |= {"head_ip": head.ip, "worker_ips": [h.ip for h in nodes]}
    cfg["auth"] = {"ssh_user": "root", "ssh_private_key": str(hosts.ssh_key)}
    path.write_text(yaml.safe_dump(cfg))
    return path


def _client(url: str) -> str:
    return textwrap.dedent(f"""
        import json, time, openai
        client = openai.OpenAI(base_url="{url}/v1", api_key="unused", max_retries=0)
        deadline = time.monotonic() + 240
        while True:
            try:
                out = client.completions.create(model="mixtral-tiny", prompt={PROMPT!r}, max_tokens={MAX_TOKENS},
                                                temperature=0)
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(2)
        chat = client.chat.completions.create(model="mixtral-tiny", messages=[{{"role": "user", "content": "Hi"}}],
                                              max_tokens=4)
        print(json.dumps({{"text": out.choices[0].text, "chat": chat.choices[0].message.content}}))
    """)  # fmt: skip


def _nodes_alive(hosts: Hosts, want: int, timeout_s: int) -> int:
    """How many nodes are alive once `want` are, or at the end of `timeout_s`: one driver on the head
    watching (a driver started per look would take CPU from the nodes' set-up)."""
    script = (
        "import ray, time; ray.init(address='auto', logging_level='ERROR'); "
        "alive = lambda: sum(n['Alive'] for n in ray.nodes()); "
        f"any(alive() >= {want} or time.sleep(1) for _ in range({timeout_s})); print('ALIVE', alive())"
    )
    r = hosts.run(hosts.hosts[0], hosts.ssh_argv(hosts.hosts[0], f"RAY_AUTH_MODE=token python -c \"{script}\""),
                  check=False, timeout_s=timeout_s + 60)  # fmt: skip
    alive = [ln.split()[1] for ln in r.stdout.splitlines() if ln.startswith("ALIVE ")]  # not Ray's own lines
    return int(alive[-1]) if r.returncode == 0 and alive else 0


def test_ray_up_on_premises_serves_and_ray_down_leaves_nothing(checkpoint_factory: Any, tmp_path: Path) -> None:
    ckpt: Path = checkpoint_factory(TINY, seed=5)
    with Hosts(3) as hosts:
        # Every machine's environment: this Python first on PATH, its own /root and RAY_TMPDIR, and (a
        # test's impatience) Ray's nodes giving up on a lost head after 10 s instead of 60 s, and this
        # machine's build of the CPU kernels, as machines made from one image share it: the set-up's
        # `build-kernels` finds it, the expert split's too (the builds themselves are tests/test_cpu_kernels.py's
        # and tests/test_expert_cost.py's; ~30 s a host).
        env, shared = {"RAY_gcs_rpc_server_reconnect_timeout_s": "10"}, []
        if (kernels := compiled.build()) is not None and compiled_split() is not None:
            env["TORCH_EXTENSIONS_DIR"] = str(Path(kernels.__file__).parent.parent)
            shared.append(env["TORCH_EXTENSIONS_DIR"])  # under /root, which is each host's own
        hosts.start_sshd(env=env, shared=shared)
        head, *nodes = hosts.hosts
        (hosts.home(head) / ".ray").mkdir()
        (hosts.home(head) / ".ray" / "auth_token").write_text(hosts.token)  # `ray get-auth-token --generate`
        config = _launcher_config(hosts, tmp_path / "cluster.yaml")
        log, started = logging.getLogger(__name__), time.monotonic()
        r = hosts.run(head, hosts.ssh_argv(head, f"ray up -y --no-config-cache {config}"), timeout_s=300, check=False)
        assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
        log.info("ray up: the head up in %.0f s", time.monotonic() - started)
        try:
            alive = _nodes_alive(hosts, 3, timeout_s=180)  # the autoscaler brings the nodes in over SSH
            assert alive == 3, f"{alive} of 3 nodes joined"
            log.info("ray up: both nodes joined %.0f s after the start", time.monotonic() - started)
            for host in hosts.hosts:  # the mount gave each machine the cluster's token
                assert (hosts.home(host) / ".ray" / "auth_token").read_text().strip() == hosts.token

            serve_config = tmp_path / "serve.yaml"
            serve_config.write_text(yaml.safe_dump({
                "model": {"checkpoint": str(ckpt), "name": "mixtral-tiny"},
                "cluster": {"attention_shards": 1, "routers": 1, "expert_groups": 2, "placement_strategy": "SPREAD",
                            "worker_resources": {"model_slot": 1}},
                "engine": {"block_size": 4, "kv_cache_gb": 0.01, "max_model_len": 512, "kernels": "torch"},
                "serving": {"host": "0.0.0.0", "http_port": 8000, "grpc_port": 9000},  # reached on the head IP
            }))  # fmt: skip
            serve = (f"RAY_AUTH_MODE=token nohup mixtral-cluster serve {serve_config} --address {head.ip}:6379 "
                     f"> {tmp_path}/serve.log 2>&1 < /dev/null & echo $! > {tmp_path}/serve.pid")  # fmt: skip
            hosts.run(head, hosts.ssh_argv(head, serve), timeout_s=60)
            answer = hosts.run(head, [sys.executable, "-c", _client(f"http://{head.ip}:8000")], timeout_s=300,
                               check=False)  # fmt: skip
            assert answer.returncode == 0, (answer.stderr[-2000:], (tmp_path / "serve.log").read_text()[-3000:])
            log.info("serve: answered %.0f s after the start", time.monotonic() - started)
            where = hosts.run(head, hosts.ssh_argv(head, f'RAY_AUTH_MODE=token python -c "{WHERE}"'))
            hosts.run(head, hosts.ssh_argv(head, f"kill -TERM $(cat {tmp_path}/serve.pid)"))  # Ctrl-C
        finally:
            down = hosts.run(head, hosts.ssh_argv(head, f"ray down -y {config}"), timeout_s=180, check=False)
        assert down.returncode == 0, (down.stdout[-3000:], down.stderr[-3000:])
        downed = time.monotonic()  # the nodes' Ray notices the head is gone (10 s), then ends
        while (left := _leftovers(hosts)) and time.monotonic() < downed + 120:
            time.sleep(1)
        log.info("ray down: every host empty %.0f s later (%.0f s after the start)", time.monotonic() - downed,
                 time.monotonic() - started)  # fmt: skip
        assert not left, f"processes left behind after ray down: {left}"

    from cluster.engine.request import SamplingParams
    from cluster.llm import LLM

    with LLM(ckpt, single_process=True) as reference:
        out = reference.generate([PROMPT], SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True))
        text = reference.tokenizer.continuation(PROMPT, out[0].token_ids)
    reply = json.loads(answer.stdout.strip().splitlines()[-1])
    assert reply["text"] == text and isinstance(reply["chat"], str)
    (line,) = [ln for ln in where.stdout.splitlines() if ln.startswith("WORKERS ")]
    worker_ips = json.loads(line.removeprefix("WORKERS "))  # the copy's workers: on the two nodes
    assert len(worker_ips) == 4 and set(worker_ips) == {h.ip for h in nodes}, worker_ips


def _leftovers(hosts: Hosts) -> dict[str, list[str]]:
    """Each host's processes other than its init and sshd (and the sessions sshd is closing)."""
    left: dict[str, list[str]] = {}
    for host in hosts.hosts:
        names = []
        for pid in host.pids():
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
            except OSError:
                continue
            if cmd and "sshd" not in cmd and not cmd.startswith("unshare") and "spec = json.loads" not in cmd:
                names.append(cmd[:120])
        if names:
            left[host.name] = names
    return left
