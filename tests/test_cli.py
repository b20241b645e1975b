"""The `mixtral-cluster` console script, run as a user runs it: a subprocess of the installed entry point."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from model import ModelConfig, load_model

pytestmark = pytest.mark.serve

ROOT = Path(__file__).resolve().parent.parent
EXE = shutil.which("mixtral-cluster", path=str(Path(sys.executable).parent)) or "mixtral-cluster"


def cli(*args: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    return subprocess.run([EXE, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("command", [[], ["serve"], ["generate"], ["make-tiny"], ["plan"]])
def test_help_explains_each_command(command: list[str]) -> None:
    out = cli(*command, "--help")
    assert out.returncode == 0 and out.stdout.startswith("usage: mixtral-cluster")
    if not command:
        for sub in ("serve", "generate", "make-tiny", "plan"):
            assert sub in out.stdout
    else:
        assert len(out.stdout.splitlines()) > 4  # a description and its options, not a bare usage line


HELP_WITHOUT = ("torch", "ray", "transformers", "mistral_common", "llguidance")
HELP_PROBE = """
import contextlib, io, sys
import cluster.cli
for argv in sys.argv[1:]:
    with contextlib.redirect_stdout(io.StringIO()) as out:
        try:
            cluster.cli.main(argv.split())
        except SystemExit as e:
            assert e.code == 0, (argv, e.code)
    assert out.getvalue().startswith("usage: mixtral-cluster"), argv
print(sorted({m.split(".")[0] for m in sys.modules} & set(HEAVY)))
"""


def test_help_of_every_command_imports_neither_torch_nor_ray() -> None:
    """`--help` answers at once: parsing options imports no torch, Ray or tokenizer (each costs
    seconds of CPU), only what each command runs on once it runs."""
    commands = ["--help", *(f"{c} --help" for c in ("serve", "generate", "make-tiny", "build-kernels", "plan",
                                                    "bench", "soak"))]  # fmt: skip
    code = f"HEAVY = {HELP_WITHOUT!r}" + HELP_PROBE
    out = subprocess.run([sys.executable, "-c", code, *commands], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", f"--help imported {out.stdout.strip()}"


def test_plan_8x22b_on_two_8_gpu_nodes_fits() -> None:
    out = cli("plan", str(ROOT / "configs/mixtral-8x22b.yaml"))
    assert out.returncode == 0, out.stderr
    rows = [ln.split() for ln in out.stdout.splitlines() if ln.startswith(("attention", "router", "experts"))]
    assert len(rows) == 11
    assert {r[2] for r in rows} == {"0", "1"}  # "node 0" / "node 1": two nodes
    assert sum(r[0].startswith("experts") for r in rows) == 8
    assert out.stdout.rstrip().endswith("fits")


def test_plan_refuses_8x22b_bf16_on_too_few_gpus(tmp_path: Path) -> None:
    cfg = yaml.safe_load((ROOT / "configs/mixtral-8x22b.yaml").read_text())
    cfg["cluster"]["expert_groups"] = 2  # 4 experts of 8x22B per 80 GB GPU: ~70 GB of weights each
    path = tmp_path / "too-small.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = cli("plan", str(path))
    assert out.returncode == 1
    assert "refused" in out.stderr and "GB" in out.stderr


def test_plan_puts_the_one_gpu_config_on_one_gpu_and_refuses_it_with_nccl(tmp_path: Path) -> None:
    out = cli("plan", str(ROOT / "configs/one-gpu.yaml"))
    assert out.returncode == 0, out.stderr
    assert "GPUs per copy: 1;" in out.stdout and out.stdout.rstrip().endswith("fits")
    cfg = yaml.safe_load((ROOT / "configs/one-gpu.yaml").read_text())
    cfg["cluster"]["transport"] = "nccl"
    path = tmp_path / "nccl.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = cli("plan", str(path))
    assert out.returncode == 1 and "use cluster.transport: gloo" in out.stderr


def test_plan_names_a_bad_field(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("model: {checkpoint: x, preset: tiny}\ncluster: {routers: 0}\n")
    out = cli("plan", str(path))
    assert out.returncode == 2 and "routers" in out.stderr


def test_make_tiny_writes_a_loadable_checkpoint(tmp_path: Path) -> None:
    out = cli("make-tiny", str(tmp_path / "tiny"), "--seed", "3")
    assert out.returncode == 0, out.stderr
    model = load_model(tmp_path / "tiny")
    assert model.config == ModelConfig.preset("tiny")


def test_generate_single_process_and_on_ray_agree(tmp_path: Path) -> None:
    cfg = yaml.safe_load((ROOT / "configs/tiny.yaml").read_text())
    cfg["model"]["checkpoint"] = str(tmp_path / "ckpt")
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    single = cli("generate", str(path), "--prompt", "Hello", "--max-tokens", "8", "--single-process")
    assert single.returncode == 0, single.stderr
    assert "first run only" in single.stderr and (tmp_path / "ckpt/config.json").is_file()
    ray = cli("generate", str(path), "--prompt", "Hello", "--max-tokens", "8")
    assert ray.returncode == 0, ray.stderr
    assert "first run only" not in ray.stderr
    assert ray.stdout == single.stdout  # the same text (the first-run line went to stderr)
    assert "[8 tokens, finish_reason=length]" in ray.stderr


def test_serve_first_run_answers_then_stops_on_ctrl_c(tmp_path: Path) -> None:
    """`mixtral-cluster serve` writes its checkpoint, serves HTTP, and shuts down cleanly on SIGINT."""
    cfg = yaml.safe_load((ROOT / "configs/tiny.yaml").read_text())
    http_port, grpc_port = free_port(), free_port()
    cfg["model"]["checkpoint"] = str(tmp_path / "ckpt")
    cfg["serving"] |= {"http_port": http_port, "grpc_port": grpc_port}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.Popen([EXE, "serve", str(path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=os.environ | {"OMP_NUM_THREADS": "1"})  # fmt: skip
    url = f"http://127.0.0.1:{http_port}"
    try:
        lines: list[str] = []
        assert proc.stdout is not None
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("Ctrl-C to stop"):
                break
        printed = "".join(lines)
        assert "first run only" in printed and f"serving mixtral-tiny at {url}" in printed, printed
        assert f"curl {url}/v1/completions" in printed
        r = httpx.post(url + "/v1/completions", json={"model": "mixtral-tiny", "prompt": "Hi", "max_tokens": 4},
                       timeout=60)  # fmt: skip
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "/health", timeout=5)
