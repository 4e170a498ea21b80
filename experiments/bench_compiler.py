"""Compiler scaling benchmark: full pipeline (verify, all passes incl. fuse=chains, lowering) on synthetic graphs.

    .venv/bin/python experiments/bench_compiler.py [--sizes 10 100 1000 10000 100000] [--repeat 3]

Graphs: many queries of 2-6 sub-queries with random dependencies on earlier sub-queries, 8 experts
over 4 models, ~15% of sub-query texts drawn from a shared pool (so dedupe finds work across
queries), and a budget that holds about two models (so residency planning evicts).
Writes experiments/results/bench_compiler.json and a log-log PNG (bench_compiler.png);
prints a markdown table. Target: 10k nodes < 1 s, near-linear growth.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from compiler import CompilerConfig, CostModel, ModelCost, compile  # noqa: E402
from compiler.ir import Graph  # noqa: E402
from compiler.synthetic import random_graph  # noqa: E402

RESULTS = ROOT / "experiments" / "results"
GiB = 1 << 30
EXPERTS = ["law", "medicine", "economics", "science_math", "general", "code", "history", "chemistry"]


def cost_model() -> CostModel:
    """4 models of different sizes (roofline-ish numbers for 0.5B-7B bf16 on one GPU); 8 experts + aggregator."""
    models = {
        "small": ModelCost(1 * GiB, 12 * 1024, 2e-5, 4e-3),
        "medium": ModelCost(3 * GiB, 28 * 1024, 5e-5, 9e-3),
        "large": ModelCost(6 * GiB, 56 * 1024, 1e-4, 1.6e-2),
        "coder": ModelCost(3 * GiB, 28 * 1024, 5e-5, 9e-3),
    }
    aliases = list(models)
    experts = {e: aliases[i % len(aliases)] for i, e in enumerate(EXPERTS)}
    experts["aggregator"] = "medium"
    return CostModel(models, experts)


def synthetic_graph(n_nodes: int, seed: int = 0) -> Graph:
    return random_graph(random.Random(seed), EXPERTS, n_nodes=n_nodes, shared_pool=max(4, n_nodes // 50))


def bench(sizes: list[int], repeat: int) -> list[dict]:
    cost = cost_model()
    config = CompilerConfig(memory_budget=10 * GiB, fuse=["chains"], max_batch_size=8)
    rows = []
    for n in sizes:
        best = None
        for _ in range(repeat):
            graph = synthetic_graph(n)  # fresh each time: no warm per-node caches from an earlier compile
            start = time.perf_counter()
            plan = compile(graph, cost, config)
            seconds = time.perf_counter() - start
            if best is None or seconds < best[0]:
                best = (seconds, plan)
        seconds, plan = best
        r = plan.report
        lru = compile(graph, cost, CompilerConfig(**{**vars(config), "residency": "lru"}))  # untimed comparison
        rows.append({
            "nodes": len(graph), "queries": len(graph.queries), "compiled_nodes": len(plan.graph),
            "steps": len(plan.steps), "loads": plan.loads, "loads_lru": lru.loads, "seconds": seconds,
            "peak_planned_bytes": plan.peak_planned_bytes, "est_span_s": plan.estimated_span_s(),
            "pass_seconds": r.pass_seconds, "verify_seconds": r.verify_seconds, "lower_seconds": r.lower_seconds,
            "us_per_node": 1e6 * seconds / len(graph),
        })
        print(f"{len(graph):>7} nodes: {seconds:.3f} s", file=sys.stderr)
    return rows


def markdown(rows: list[dict]) -> str:
    passes = list(rows[0]["pass_seconds"])
    head = ["nodes", "queries", "after passes", "steps", "loads (LRU)", "total s", "us/node", "verify s",
            *[f"{p} s" for p in passes], "lower s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["nodes"], r["queries"], r["compiled_nodes"], r["steps"], f"{r['loads']} ({r['loads_lru']})",
                 f"{r['seconds']:.4f}",
                 f"{r['us_per_node']:.1f}", f"{r['verify_seconds']:.4f}",
                 *[f"{r['pass_seconds'].get(p, 0.0):.4f}" for p in passes], f"{r['lower_seconds']:.4f}"]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib  # a project dependency

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    xs = [r["nodes"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.loglog(xs, [r["seconds"] for r in rows], "o-", label="total")
    for p in rows[0]["pass_seconds"]:
        ax.loglog(xs, [max(r["pass_seconds"].get(p, 0.0), 1e-6) for r in rows], ".--", label=p)
    ax.loglog(xs, [r["lower_seconds"] for r in rows], ".--", label="lower")
    ax.loglog(xs, [xs[-1] and rows[-1]["seconds"] * x / xs[-1] for x in xs], ":", color="gray", label="linear")
    ax.set_xlabel("nodes")
    ax.set_ylabel("seconds")
    ax.set_title("compllm compiler: full pipeline")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 1000, 10000, 100000])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    rows = bench(args.sizes, args.repeat)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
           "repeat_best_of": args.repeat, "config": "all passes, fuse=chains, budget 10 GiB, 4 models (13 GiB)",
           "rows": rows}
    (RESULTS / "bench_compiler.json").write_text(json.dumps(out, indent=2) + "\n")
    plot(rows, RESULTS / "bench_compiler.png")
    print(markdown(rows))
    print(f"\nwrote {RESULTS / 'bench_compiler.json'}, bench_compiler.png")


if __name__ == "__main__":
    main()
