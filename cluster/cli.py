"""`mixtral-cluster`: serve, generate, make-tiny, plan.

mixtral-cluster serve                     # tiny model, local mode, http://127.0.0.1:8000, gRPC :9000
mixtral-cluster serve configs/mixtral-8x22b.yaml --address auto
mixtral-cluster generate --prompt "Hello" --max-tokens 32
mixtral-cluster make-tiny checkpoints/tiny
mixtral-cluster plan configs/mixtral-8x22b.yaml
mixtral-cluster bench --quick --json bench/quick.json
mixtral-cluster soak --minutes 10
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from benchmarks.args import BENCH_DESCRIPTION, SOAK_DESCRIPTION, bench_parser, soak_parser
from model.config import DTYPE_NAMES, preset_names
from protocol.experts import PlacementError

# The options (and `--help`) need neither torch nor Ray: each command imports what it runs on.
if TYPE_CHECKING:
    from cluster.serving.config import ServeConfig

logger = logging.getLogger("mixtral_cluster")
GRPC_SERVICER = "cluster.proto.inference_pb2_grpc.add_InferenceServicer_to_server"


def default_config_path() -> Path:
    return Path(str(resources.files("configs").joinpath("tiny.yaml")))


def _load(path: str | None) -> ServeConfig:
    from cluster.serving.config import ServeConfig

    return ServeConfig.load(path or default_config_path())


# ---- serve -----------------------------------------------------------------------------------


def serve_options(cfg: ServeConfig) -> dict[str, Any]:
    """`serve.start` options from the config's `serving` section."""
    from ray.serve.config import HTTPOptions, gRPCOptions

    srv = cfg.serving
    return {
        "proxy_location": "HeadOnly",  # clients reach the head; GPU nodes carry model workers only
        "http_options": HTTPOptions(host=srv.host, port=srv.http_port, request_timeout_s=srv.request_timeout_s),
        "grpc_options": gRPCOptions(port=srv.grpc_port, grpc_servicer_functions=[GRPC_SERVICER]),
    }


def cmd_serve(args: argparse.Namespace) -> int:
    import ray
    from ray import serve

    from cluster.serving.app import build_app

    cfg = _load(args.config)
    cfg.ensure_checkpoint(progress=True)
    srv = cfg.serving
    bundles = cfg.replica_bundles(cfg.model_shape().num_experts)
    if args.address:
        from cluster.backend.ray_connect import connect_ray

        connect_ray(args.address)  # RayRefused (a ConnectionError) names the token fix
    else:  # local mode: logical CPU slots for every replica's bundles, the ingress and the proxies
        cpus = sum(b.get("CPU", 0) for b in bundles) * srv.max_replicas + 4
        ray.init(address="local", num_cpus=max(os.cpu_count() or 1, int(cpus)), include_dashboard=False,
                 logging_level=logging.WARNING)  # fmt: skip
    serve.start(**serve_options(cfg))
    print(f"starting {cfg.model.name} ({cfg.cluster.attention_shards} attention shards, {cfg.cluster.routers} "
          f"routers, {cfg.cluster.expert_groups} expert groups per copy) ...", flush=True)  # fmt: skip
    serve.run(build_app(cfg), name="mixtral", route_prefix="/")
    url = f"http://{srv.host}:{srv.http_port}"
    auth = f' -H "Authorization: Bearer {srv.api_key}"' if srv.api_key else ""
    print(f"\nserving {cfg.model.name} at {url}  (OpenAI API under /v1, gRPC on {srv.host}:{srv.grpc_port})")
    print(f"try:\n  curl {url}/v1/completions{auth} -H 'Content-Type: application/json' \\\n"
          f"    -d '{{\"model\": \"{cfg.model.name}\", \"prompt\": \"Hello\", \"max_tokens\": 16}}'")  # fmt: skip
    print("Ctrl-C to stop.", flush=True)
    stop = False

    def _stop(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    while not stop:
        time.sleep(0.2)
    print("shutting down ...", flush=True)
    serve.shutdown()  # type: ignore[no-untyped-call]
    ray.shutdown()
    return 0


# ---- generate --------------------------------------------------------------------------------


def cmd_generate(args: argparse.Namespace) -> int:
    from cluster.engine.request import SamplingParams
    from cluster.llm import LLM

    cfg = _load(args.config)
    cfg.ensure_checkpoint(progress=True)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    overrides: dict[str, Any] = {"single_process": True} if args.single_process else {}
    if args.redundant_experts is not None:
        overrides["redundant_experts"] = args.redundant_experts
    with LLM(cfg, ray_address=args.address, **overrides) as llm:
        prompt = llm.encode_chat([{"role": "user", "content": args.prompt}]) if args.chat else args.prompt
        out = llm.generate([prompt], params)[0]
    print(out.text)
    print(f"[{len(out.token_ids)} tokens, finish_reason={out.finish_reason}]", file=sys.stderr)
    return 0


# ---- make-tiny -------------------------------------------------------------------------------


def cmd_make_tiny(args: argparse.Namespace) -> int:
    from model.checkpoint_writers import write_random_checkpoint
    from model.config import ModelConfig, torch_dtype

    dtype = torch_dtype(args.dtype)
    path = write_random_checkpoint(
        ModelConfig.preset(args.preset), args.dir, seed=args.seed, dtype=dtype, progress=True
    )
    print(f"wrote a seeded {args.preset!r} checkpoint (seed {args.seed}, {args.dtype}) to {path}")
    return 0


# ---- plan ------------------------------------------------------------------------------------


def plan_rows(cfg: ServeConfig) -> tuple[list[tuple[str, str, str, int, int]], list[str]]:
    """(actor, node, device, weight bytes, KV bytes) per worker, and problems that make it unfit."""
    from cluster.backend.placement import (
        Layout,
        Slot,
        assign_slots,
        check_memory,
        check_transport,
        param_bytes,
        worker_resources,
        worker_specs,
    )

    shape = cfg.model_shape()
    clu = cfg.cluster
    specs = worker_specs(Layout.of(clu), shape.num_experts)
    itemsize = cfg.dtype.itemsize
    kv = int(cfg.engine.kv_cache_gb * (1 << 30))
    problems: list[str] = []
    gpu = clu.device == "cuda"
    if gpu:
        try:
            check_transport(clu)
        except PlacementError as e:
            problems.append(str(e))
        share = worker_resources(clu).get("GPU", 1.0) or 1.0
        slots = assign_slots(len(specs), clu.gpus_per_node, clu.placement_strategy, gpu_share=share)
        try:
            check_memory(shape, specs, itemsize, int(clu.gpu_memory_gb * 1e9))
        except PlacementError as e:
            problems.append(str(e))
    else:
        slots = [Slot(0, -1)] * len(specs)
    rows = []
    on_gpu: dict[Slot, list[tuple[str, int]]] = {}  # the workers that share each GPU
    for spec, slot in zip(specs, slots, strict=True):
        weights = param_bytes(shape, spec, itemsize)
        cache = kv if spec.role == "attention" else 0
        device = f"GPU {slot.gpu}" if gpu else "CPU"
        rows.append((spec.name, f"node {slot.node}", device, weights, cache))
        on_gpu.setdefault(slot, []).append((spec.name, weights + cache))
    for slot, held in on_gpu.items() if gpu else ():
        total = sum(n for _, n in held)
        if total > clu.gpu_memory_gb * 1e9 * 0.9:
            names = ", ".join(name for name, _ in held)
            problems.append(
                f"GPU {slot.gpu} of node {slot.node} ({names}): {total / 1e9:.1f} GB of weights and KV cache "
                f"exceed 90% of a {clu.gpu_memory_gb:.0f} GB GPU"
            )
    return rows, sorted(set(problems))


def cmd_plan(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    shape = cfg.model_shape()
    try:
        rows, problems = plan_rows(cfg)
    except PlacementError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    clu = cfg.cluster
    nodes = len({r[1] for r in rows})
    print(f"{cfg.model.name}: {shape.num_parameters / 1e9:.1f}B parameters in {cfg.model.dtype}; "
          f"{len(rows)} workers per model copy ({clu.attention_shards} attention shards, {clu.routers} routers, "
          f"{clu.expert_groups} expert groups) on {nodes} node(s), strategy {clu.placement_strategy}")  # fmt: skip
    print(f"{'actor':<14} {'node':<8} {'device':<7} {'weights':>10} {'KV cache':>10} {'total':>10}")
    for name, node, device, weights, cache in rows:
        print(f"{name:<14} {node:<8} {device:<7} {_gb(weights):>10} {_gb(cache):>10} {_gb(weights + cache):>10}")
    replicas = cfg.serving.max_replicas
    if clu.device == "cuda":
        gpus = len({(node, device) for _, node, device, _, _ in rows})
        print(f"GPUs per copy: {gpus}; for {replicas} replica(s): {gpus * replicas} GPUs "
              f"({clu.gpu_memory_gb:.0f} GB each, {clu.gpus_per_node} per node), plus 1 CPU per replica")  # fmt: skip
    if problems:
        for p in problems:
            print(f"error: {p}", file=sys.stderr)
        print("refused: this plan does not fit", file=sys.stderr)
        return 1
    print("fits")
    return 0


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


# ---- bench -----------------------------------------------------------------------------------


def cmd_bench(args: argparse.Namespace) -> int:
    try:
        from benchmarks.run import main as bench_main
    except ImportError as e:
        return _needs_extra("bench", e)
    return bench_main(parsed=args)


def cmd_soak(args: argparse.Namespace) -> int:
    try:
        from benchmarks.soak import main as soak_main
    except ImportError as e:
        return _needs_extra("soak", e)
    return soak_main(parsed=args)


def _needs_extra(command: str, e: ImportError) -> int:
    print(f"error: `mixtral-cluster {command}` needs the bench extra ({e.name or e} is missing): "
          "pip install -e '.[bench]'", file=sys.stderr)  # fmt: skip
    return 2


# ---- build-kernels ----------------------------------------------------------------------------


def cmd_build_kernels(args: argparse.Namespace) -> int:
    """Compile the CPU decode kernels and the routers' expert split into torch's extension cache on
    this host, ahead of any worker."""
    import time as clock

    from model.kernels import compiled
    from protocol.expert_cost import compiled_split

    started = clock.monotonic()
    print("building the CPU decode kernels and the expert split for this host (~30 s the first time) ...", flush=True)
    if compiled.build() is None:
        print("error: the CPU kernels cannot be built here (see the warning above); workers will use torch's "
              "kernels, or set engine.kernels: torch", file=sys.stderr)  # fmt: skip
        return 1
    if compiled_split() is None:
        print("error: the expert split cannot be built here (see the warning above); routers will split in Python",
              file=sys.stderr)  # fmt: skip
        return 1
    print(f"CPU kernels and expert split ready in {clock.monotonic() - started:.1f} s (cached for every worker "
          "on this host)")  # fmt: skip
    return 0


# ---- entry point ------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mixtral-cluster",
        description="Serve Mixtral-style mixture-of-experts models across a Ray cluster "
        "(attention shards, routers and expert groups as Ray actors, an OpenAI-compatible HTTP API and gRPC).",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("serve", help="start the HTTP + gRPC server (default: tiny model, local mode)",
                       description="Start Ray Serve with the OpenAI-compatible HTTP API and the gRPC service. "
                       "Without CONFIG: the tiny model on this machine (configs/tiny.yaml), writing its seeded "
                       "checkpoint on first run.")  # fmt: skip
    s.add_argument("config", nargs="?", help="deployment config YAML (default: the packaged configs/tiny.yaml)")
    s.add_argument("--address", help="Ray cluster to join (e.g. 'auto' on a `ray up` head); default: a local Ray")
    s.set_defaults(fn=cmd_serve)

    g = sub.add_parser("generate", help="generate text offline (no HTTP server)",
                       description="Load the model copy of a config and generate one completion.")  # fmt: skip
    g.add_argument("config", nargs="?", help="deployment config YAML (default: the packaged configs/tiny.yaml)")
    g.add_argument("--prompt", required=True, help="prompt text")
    g.add_argument("--chat", action="store_true", help="wrap the prompt as one user turn in the Mistral chat format")
    g.add_argument("--max-tokens", type=int, default=32, help="tokens to generate (default 32)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0)")
    g.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    g.add_argument("--single-process", action="store_true", help="run the model in this process, without Ray")
    g.add_argument("--redundant-experts", type=int, metavar="N",
                   help="extra expert slots over the groups (default: cluster.redundant_experts)")  # fmt: skip
    g.add_argument("--address", help="Ray cluster to join; default: a local Ray")
    g.set_defaults(fn=cmd_generate)

    m = sub.add_parser("make-tiny", help="write a seeded random checkpoint (HF safetensors layout)",
                       description="A seeded random checkpoint of a preset (transformers loads it too).")  # fmt: skip
    m.add_argument("dir", nargs="?", default="checkpoints/tiny", help="output directory (default checkpoints/tiny)")
    m.add_argument("--preset", default="tiny", choices=preset_names(), help="model shape (default tiny)")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--dtype", default="float32", choices=DTYPE_NAMES)
    m.set_defaults(fn=cmd_make_tiny)

    bk = sub.add_parser("build-kernels", help="compile the CPU decode kernels and the expert split on this host, "
                        "ahead of its workers",
                        description="Compile model/csrc and protocol/csrc into torch's extension cache (~30 s once "
                        "per host), so that workers starting here need not: run it in setup_commands on CPU "
                        "nodes.")  # fmt: skip
    bk.set_defaults(fn=cmd_build_kernels)

    pl = sub.add_parser("plan", help="show which actor goes on which node and GPU, and whether it fits",
                        description="Print the placement of one model copy: actor, node, GPU, weight and KV bytes; "
                        "exit 1 if the plan does not fit (e.g. bf16 8x22B on too few 80 GB GPUs).")  # fmt: skip
    pl.add_argument("config", help="deployment config YAML")
    pl.set_defaults(fn=cmd_plan)

    b = sub.add_parser("bench", help="benchmark throughput, latency, step breakdown and roofline",
                       description=BENCH_DESCRIPTION)  # fmt: skip
    bench_parser(b)
    b.set_defaults(fn=cmd_bench)

    k = sub.add_parser("soak", help="run mixed traffic for a while and check nothing leaks or drifts",
                       description=SOAK_DESCRIPTION)  # fmt: skip
    soak_parser(k)
    k.set_defaults(fn=cmd_soak)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return int(args.fn(args))
    except (FileNotFoundError, ValueError, ConnectionError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
