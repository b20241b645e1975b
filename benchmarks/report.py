"""The benchmark's outputs: a Markdown table and PNG plots next to the JSON file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from benchmarks.breakdown import PARTS


def write_json(path: Path | None, result: Any) -> None:
    """The figures as JSON at `path` (its folder made), when a path is given."""
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")


def markdown(r: dict[str, Any]) -> str:
    s = r["setup"]
    tp = r["throughput_tok_s"]
    lines = [
        f"# Benchmark: {s['preset'] or s['checkpoint']} ({s['parameters'] / 1e6:.0f}M parameters, {s['dtype']}, "
        f"{s['device']})",
        "",
        f"Command: `{s['command']}`",
        "",
        f"Workload: {s['prompts']} prompts of {s['min_len']}-{s['max_len']} tokens x {s['new_tokens']} new tokens, "
        f"greedy; cluster layout A={s['layout'][0]} R={s['layout'][1]} G={s['layout'][2]}.",
        "",
        "## Offline throughput",
        "",
        "| system | tokens/s | seconds | vs transformers |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name in (n for n in ("hf", "single", "cluster") if n in tp):
        ratio = f"{tp[name] / tp['hf']:.2f}x" if "hf" in tp else ""
        lines.append(f"| {_SYSTEMS[name]} | {tp[name]:.1f} | {r['throughput_seconds'][name]:.2f} | {ratio} |")
    if "hf_prefill_seconds" in r and "single_steps" in r:
        st = r["single_steps"]
        lines.append(
            f"\nWhere the time goes: transformers' padded prefill alone takes {r['hf_prefill_seconds']:.2f} s of its "
            f"run; the single-process engine spends {st['prefill_seconds']:.2f} s in {st['prefill_steps']} prefill "
            f"steps and {st['decode_seconds']:.2f} s in {st['decode_steps']} decode steps."
        )
    for name, a in r["agreement"].items():
        lines.append(
            f"\nGreedy outputs, {name}: {a['identical']}/{a['prompts']} prompts identical "
            f"(mean agreeing prefix {100 * a['mean_prefix_share']:.1f}%)."
        )
    pc = r.get("prefix_cache")
    if pc:
        lines += [
            "", f"## Prefix cache: time to first token with a {pc['prefix_tokens']}-token prefix", "",
            f"| prefix | TTFT ms (median of {pc['rounds']}) |", "| --- | ---: |",
            f"| not cached (first request of a prefix) | {pc['cold_ms']:.1f} |",
            f"| cached ({pc['cached_tokens']} prompt tokens from the cache) | {pc['warm_ms']:.1f} |",
            f"\nThe cached prefix answers {pc['speedup']:.1f}x sooner (single-process engine, one request at a time).",
        ]  # fmt: skip
    so = r.get("structured")
    if so:
        lines += [
            "", f"## Structured outputs: {so['requests']} requests with a JSON schema each vs free", "",
            "| requests | tokens/s |", "| --- | ---: |",
            f"| free (temperature 1.0) | {so['tok_s']['free']:.1f} |",
            f"| each under the JSON schema | {so['tok_s']['constrained']:.1f} |",
            f"\nConstrained over free: {so['ratio']:.2f}x. Masks: {so['mask_ms_per_step']:.2f} ms of a "
            f"{so['step_ms']:.2f} ms decode step (median), {100 * so['mask_share']:.1f}% of the run's step time.",
        ]  # fmt: skip
    sk = r.get("skewed")
    if sk:
        lines += ["", "## Skewed expert load (G=4, 4 redundant experts): before and after re-placement", "",
                  "| placement | tokens/s | imbalance | cost imbalance (decode / prefill) | step | ms | "
                  "expert_ffn ms | data_plane ms |",
                  "| --- | ---: | ---: | --- | --- | ---: | ---: | ---: |"]  # fmt: skip
        for phase in ("before", "after"):
            p = sk[phase]
            ci = p.get("cost_imbalance", {})
            for step, b in (("decode", p["breakdown"]), ("prefill", p.get("prefill_breakdown"))):
                if b is None:
                    continue
                lines.append(f"| {phase} re-placement | {p['tokens_per_s']:.1f} | {p['imbalance']:.2f} | "
                             f"{ci.get('decode', 1.0):.2f} / {ci.get('prefill', 1.0):.2f} | {step} | "
                             f"{b['step']:.2f} | {b['expert_ffn']:.2f} | {b['data_plane']:.2f} |")  # fmt: skip
        rb = sk["rebalance"]
        nan = float("nan")
        predicted = "; ".join(f"{k} expert ms {v['expert_ms_before']:.3f} -> {v.get('expert_ms_after', nan):.3f}"
                              for k, v in rb.get("phases", {}).items())  # fmt: skip
        refused = f"; refused: {rb['refused']}" if "refused" in rb else ""
        if pr := sk.get("paired"):
            b, a = pr["before"], pr["after"]
            lines.append(f"\nPaired, {pr['rounds']} rounds of the two placements in turn on the same copy (medians): "
                         f"decode step {b['decode_ms_median']:.1f} -> {a['decode_ms_median']:.1f} ms, 512-token "
                         f"prefill step {b['prefill_ms_median']:.1f} -> {a['prefill_ms_median']:.1f} ms.")  # fmt: skip
        lines.append(f"\nThe re-placement moved {rb['moved']} expert weights (layer x slot); it predicted the pair "
                     f"imbalance {rb['imbalance_before']:.2f} -> {rb.get('imbalance_after', nan):.2f} "
                     f"for the load it saw ({predicted}){refused}.")  # fmt: skip
    lat = r.get("latency", [])
    if lat:
        lines += ["", "## Serving latency (HTTP, streamed)", "",
                  "| concurrency | requests | TTFT p50 ms | TTFT p95 ms | ITL p50 ms | ITL p95 ms | req/s | tokens/s |",
                  "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
        for row in lat:
            lines.append(
                f"| {row['concurrency']} | {row['requests']} | {row['ttft_ms']['p50']:.1f} | "
                f"{row['ttft_ms']['p95']:.1f} | {row['itl_ms']['p50']:.1f} | {row['itl_ms']['p95']:.1f} | "
                f"{row['requests_per_s']:.2f} | {row['tokens_per_s']:.1f} |"
            )
    b = r.get("breakdown")
    if b:
        lines += ["", f"## Cluster decode step ({b['tokens_per_step']:.0f} tokens per step, {b['steps']} steps)", "",
                  "| part | ms per step | share |", "| --- | ---: | ---: |"]  # fmt: skip
        for part in PARTS:
            lines.append(f"| {part} | {b[part]:.2f} | {100 * b[part] / b['step']:.1f}% |")
        lines.append(f"| **step** | {b['step']:.2f} | 100% |")
        c = r["collectives"]
        lines.append(
            f"\nData plane per layer (medians): {c['data_plane_per_layer_ms']:.3f} ms in the cluster vs "
            f"{c['raw_per_layer_ms']:.3f} ms for the same collectives alone: {c['ratio']:.2f}x."
        )
    rf = r.get("roofline")
    if rf:
        lines += [
            "",
            "## Roofline (single process, batch 1 decode)",
            "",
            f"{rf['bytes_per_step'] / 1e6:.1f} MB of weights per step. Each round times a 512 MB copy, then "
            "the decode steps right after it; the floor is the bytes over that copy bandwidth.",
            "",
            "| round | copy GB/s | floor ms | step ms | step / floor |",
            "| ---: | ---: | ---: | ---: | ---: |",
        ]
        for i, p in enumerate(rf["rounds"], 1):
            floor = rf["bytes_per_step"] / p["bandwidth_gb_s"] / 1e6
            lines.append(f"| {i} | {p['bandwidth_gb_s']:.1f} | {floor:.2f} | {p['step_ms']:.2f} | {p['ratio']:.2f}x |")
        lines += ["", f"Median step / floor of its round: **{rf['ratio']:.2f}x**. Against the best bandwidth of "
                  f"the run ({rf['bandwidth_gb_s']:.1f} GB/s, floor {rf['floor_ms']:.2f} ms), the median step "
                  f"({rf['measured_ms']:.2f} ms) is {rf['ratio_vs_best']:.2f}x."]  # fmt: skip
    rb = r.get("roofline_batch")
    if rb:
        lines += ["", f"A decode step of {rb['batch']} sequences reads {rb['experts_read']:.1f} experts per layer "
                  f"(expected, uniform routing): {rb['bytes_per_step'] / 1e6:.1f} MB, floor {rb['floor_ms']:.2f} ms "
                  f"at {rb['bandwidth_gb_s']:.1f} GB/s; the step takes {rb['step_ms']:.2f} ms: "
                  f"**{rb['ratio']:.2f}x** its floor."]  # fmt: skip
    return "\n".join(lines) + "\n"


_SYSTEMS = {"hf": "transformers generate (padded batch)", "single": "single-process engine", "cluster": "cluster"}


def plots(r: dict[str, Any], stem: Path) -> list[Path]:
    """PNG plots: throughput per system, latency percentiles per concurrency, the step breakdown."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    tp = r["throughput_tok_s"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    names = [n for n in ("hf", "single", "cluster") if n in tp]
    ax.bar([_SYSTEMS[n].split(" (")[0] for n in names], [tp[n] for n in names], color=["#888", "#2a7", "#27a"])
    ax.set_ylabel("generated tokens/s")
    ax.set_title("Offline throughput")
    written.append(_save(fig, stem.with_name(stem.name + "-throughput.png")))

    lat = r.get("latency", [])
    if lat:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        conc = [row["concurrency"] for row in lat]
        for key, style in (("ttft_ms", "-o"), ("itl_ms", "-s")):
            for q in ("p50", "p95"):
                ax.plot(conc, [row[key][q] for row in lat], style, label=f"{key.split('_')[0].upper()} {q}")
        ax.set_xscale("log", base=2)
        ax.set_xticks(conc, [str(c) for c in conc])
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel("ms")
        ax.set_title("Serving latency")
        ax.legend()
        written.append(_save(fig, stem.with_name(stem.name + "-latency.png")))

    b = r.get("breakdown")
    if b:
        fig, ax = plt.subplots(figsize=(8, 2.5))
        left = 0.0
        for part in PARTS:
            ax.barh([0], [b[part]], left=left, label=part)
            left += b[part]
        ax.set_yticks([])
        ax.set_xlabel("ms per decode step")
        ax.set_title("Cluster step breakdown")
        ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
        written.append(_save(fig, stem.with_name(stem.name + "-breakdown.png")))
    return written


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    fig.clf()
    return path
