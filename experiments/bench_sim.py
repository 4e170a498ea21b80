"""Scale study on the `sim` backend: compiled plans vs the lower bound on a simulated 80 GB H100.

    .venv/bin/python experiments/bench_sim.py [--queries 100 1000] [--seed 0] [--trace PATH]

Workload: `compiler.synthetic.random_graph` queries of 2-6 sub-queries (random deps, ~15% shared texts)
routed to 16 experts over 6 bf16 models of 7B-14B (115 GB of weights: they cannot all be resident).
Costs: `ModelCost.roofline` with H100 SXM numbers (3.35 TB/s HBM, 60% of 989 dense bf16 TFLOP/s),
5 ms per call, 150 prompt tokens of system prompt/template per call, loads at 10 GB/s (page-cached
safetensors -> GPU), batch_alpha 0.02 (the roofline per-sequence surcharge of a decode step is the
sequence's KV re-read, ~0.3-3% of these models' weights; the compiler default 0.1 is a row of its own).
Budget: 80e9 bytes. Each config is compiled and simulated (shared device; see compllm/backends/sim.py);
gaps are makespan / bound - 1, where "work" = total generate seconds (a tighter bound on one GPU).
Writes experiments/results/bench_sim.{json,md,png} and prints the table.
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from compiler import CompilerConfig, CostModel, ModelCost, compile  # noqa: E402
from compiler.synthetic import random_graph  # noqa: E402
from compiler.simulate import simulate, to_chrome_trace  # noqa: E402

RESULTS = ROOT / "experiments" / "results"
BUDGET = 80 * 10**9
BANDWIDTH = 3.35e12
FLOPS = 0.6 * 989e12
EXPERTS = ["law", "medicine", "economics", "science_math", "general", "code", "history", "chemistry", "physics",
           "biology", "finance", "philosophy", "psychology", "geography", "literature", "engineering"]
MODELS = {  # alias: (params, layers, kv heads, head dim), bf16 weights and KV cache
    "llama2-7b": (6.74e9, 32, 32, 128),
    "mistral-7b": (7.24e9, 32, 8, 128),
    "qwen2.5-7b": (7.62e9, 28, 4, 128),
    "llama3-8b": (8.03e9, 32, 8, 128),
    "llama2-13b": (13.0e9, 40, 40, 128),
    "qwen2.5-14b": (14.8e9, 48, 8, 128),
}


def cost_model(batch_alpha: float = 0.02, load_bytes_per_s: float = 10e9) -> CostModel:
    models = {alias: ModelCost.roofline(int(p), 2, layers, kv, hd, BANDWIDTH, FLOPS, call_overhead_s=0.005)
              for alias, (p, layers, kv, hd) in MODELS.items()}
    aliases = list(models)
    experts = {e: aliases[i % len(aliases)] for i, e in enumerate(EXPERTS)}
    experts["aggregator"] = "llama3-8b"
    return CostModel(models, experts, batch_alpha=batch_alpha, prompt_overhead_tokens=150,
                     load_bytes_per_s=load_bytes_per_s)


@dataclass(frozen=True)
class Config:
    name: str
    compiler: dict = field(default_factory=dict)  # CompilerConfig overrides
    cost: dict = field(default_factory=dict)  # cost_model() overrides


CONFIGS = [
    Config("compiled (belady)"),
    Config("compiled (lru)", {"residency": "lru"}),
    Config("no batch", {"max_batch_size": 1, "max_call_size": 1}),
    Config("2 streams", {"streams": 2}),
    Config("batch 32", {"max_batch_size": 32}),
    Config("no refill", {"max_call_size": None}),
    Config("alpha 0.1", cost={"batch_alpha": 0.1}),
    Config("slow loads 2 GB/s", cost={"load_bytes_per_s": 2e9}),
]


def breakdown(plan, cm: CostModel) -> dict[str, float]:
    """Generate seconds the bytes term does not see: call overhead, (left-padded) prefill, and the batch
    surcharge (decode_s x batch_alpha x (live rows - 1) per decode step), next to the KV re-reads that
    surcharge stands for. Phase by phase, as `CostModel.batch_seconds` prices a call."""
    out = {"overhead_s": 0.0, "prefill_s": 0.0, "surcharge_s": 0.0}
    for s in plan.steps:
        if s.kind.value != "generate":
            continue
        tokens = [cm.node_tokens(plan.graph.nodes[n], plan.graph) for n in s.nodes]
        mc = cm.cost(s.model)
        out["overhead_s"] += mc.call_overhead_s
        for group, steps, live in cm.call_phases(tokens, s.slots or None):
            if group:
                out["prefill_s"] += len(group) * max(p for p, _ in group) * mc.prefill_s_per_token
            out["surcharge_s"] += steps * (cm.decode_step_seconds(s.model, live) - mc.decode_s_per_token)
    return out


def bench(queries: list[int], seed: int, trace: Path | None) -> list[dict]:
    rows = []
    for n in queries:
        graph = random_graph(random.Random(seed), EXPERTS, n_queries=n, shared_pool=max(8, n // 50))
        reference = None
        for cfg in CONFIGS:
            cm = cost_model(**cfg.cost)
            config = CompilerConfig(memory_budget=BUDGET, **cfg.compiler)
            start = time.perf_counter()
            plan = compile(graph, cm, config)
            compiled_s = time.perf_counter() - start
            start = time.perf_counter()
            sim = simulate(plan, cm, bandwidth_Bps=BANDWIDTH)
            sim_s = time.perf_counter() - start
            if reference is None:
                reference = sim.lower_bound_s
                if trace is not None and n == max(queries):
                    trace.write_text(json.dumps(to_chrome_trace(sim, name=f"compllm sim: {n} queries, {cfg.name}")))
            io = plan.streams
            rows.append({
                "queries": n, "config": cfg.name, "nodes": len(graph), "compiled_nodes": len(plan.graph),
                "generates": sim.generates, "mean_batch": len(plan.graph) / max(sim.generates, 1),
                "loads": sim.loads, "evictions": sim.evictions, "makespan_s": sim.makespan_s,
                "lower_bound_s": sim.lower_bound_s, "critical_path_s": sim.critical_path_s,
                "bytes_read_bound_s": sim.bytes_read_bound_s, "work_bound_s": sim.work_bound_s,
                "gap": sim.gap, "gap_vs_work": sim.makespan_s / sim.work_bound_s - 1,
                "vs_reference_bound": sim.makespan_s / reference, "compute_utilisation": sim.compute_utilisation,
                "io_utilisation": sim.stream_utilisation.get(io, 0.0),
                "load_s_total": sim.stream_busy_s.get(io, 0.0),
                "peak_resident_GB": sim.peak_resident_bytes / 1e9, "peak_used_GB": sim.peak_used_bytes / 1e9,
                "kv_reread_GB": sim.kv_reread_bytes / 1e9, "bytes_read_GB": sim.bytes_read / 1e9,
                "steps_faster_than_bandwidth": sim.steps_faster_than_bandwidth,
                **breakdown(plan, cm), "kv_reread_s": sim.kv_reread_bytes / BANDWIDTH,
                "idle_s": sim.makespan_s - sim.work_bound_s,
                "compile_s": compiled_s, "simulate_s": sim_s,
            })
            print(f"{n:>5} queries, {cfg.name:<20} makespan {sim.makespan_s:8.1f} s  bound {sim.lower_bound_s:8.1f} s"
                  f"  ({compiled_s:.2f} s compile, {sim_s:.3f} s sim)", file=sys.stderr)
    return rows


def markdown(rows: list[dict]) -> str:
    head = ["queries", "config", "calls", "mean batch", "loads", "evicts", "makespan s", "lower bound s",
            "crit. path s", "bytes/BW s", "work s", "gap vs bound", "gap vs work", "vs compiled bound",
            "compute util", "load s", "peak GB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["queries"], r["config"], r["generates"], f"{r['mean_batch']:.1f}", r["loads"], r["evictions"],
                 f"{r['makespan_s']:.1f}", f"{r['lower_bound_s']:.1f}", f"{r['critical_path_s']:.1f}",
                 f"{r['bytes_read_bound_s']:.1f}", f"{r['work_bound_s']:.1f}", f"{100 * r['gap']:.1f}%",
                 f"{100 * r['gap_vs_work']:.1f}%", f"{r['vs_reference_bound']:.2f}x",
                 f"{100 * r['compute_utilisation']:.0f}%", f"{r['load_s_total']:.1f}", f"{r['peak_resident_GB']:.1f}"]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


def gap_table(rows: list[dict]) -> str:
    """Where makespan - (bytes/BW) goes: work the bytes term does not count, then compute idle time."""
    head = ["queries", "config", "makespan - bytes/BW s", "prefill s", "batch surcharge s", "(KV re-read/BW s)",
            "call overhead s", "compute idle s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["queries"], r["config"], f"{r['makespan_s'] - r['bytes_read_bound_s']:.1f}",
                 f"{r['prefill_s']:.1f}", f"{r['surcharge_s']:.1f}", f"({r['kv_reread_s']:.1f})",
                 f"{r['overhead_s']:.1f}", f"{r['idle_s']:.1f}"]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib  # a project dependency

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    sizes = sorted({r["queries"] for r in rows})
    fig, axes = plt.subplots(1, len(sizes), figsize=(6 * len(sizes), 4.5), squeeze=False)
    for ax, n in zip(axes[0], sizes):
        mine = [r for r in rows if r["queries"] == n]
        xs = range(len(mine))
        w = 0.27
        ax.bar([x - w for x in xs], [r["makespan_s"] for r in mine], w, label="simulated makespan")
        ax.bar(list(xs), [r["work_bound_s"] for r in mine], w, label="work bound (sum of generates)")
        ax.bar([x + w for x in xs], [r["lower_bound_s"] for r in mine], w,
               label="lower bound max(crit. path, bytes/BW)")
        ax.set_xticks(list(xs), [r["config"] for r in mine], rotation=35, ha="right", fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("seconds (log)")
        ax.set_title(f"{n} queries x 16 experts, 6 models, 80 GB H100 (simulated)", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--trace", type=Path, default=None,
                        help="write the Chrome trace of the largest compiled (belady) run here")
    args = parser.parse_args()
    rows = bench(args.queries, args.seed, args.trace)
    RESULTS.mkdir(parents=True, exist_ok=True)
    cm = cost_model()
    out = {"python": platform.python_version(), "seed": args.seed, "budget_bytes": BUDGET, "bandwidth_Bps": BANDWIDTH,
           "flops": FLOPS, "models": {a: {"weight_bytes": mc.weight_bytes, "kv_bytes_per_token": mc.kv_bytes_per_token,
                                          "decode_s_per_token": mc.decode_s_per_token,
                                          "load_s": cm.load_seconds(a)} for a, mc in cm.models.items()},
           "configs": [{"name": c.name, "compiler": c.compiler, "cost": c.cost} for c in CONFIGS], "rows": rows}
    (RESULTS / "bench_sim.json").write_text(json.dumps(out, indent=2) + "\n")
    table = markdown(rows) + "\n\nWhere the gap to the bytes term goes (batch KV written once is in both):\n\n" \
        + gap_table(rows)
    (RESULTS / "bench_sim.md").write_text("# Simulated makespan vs lower bound (experiments/bench_sim.py)\n\n"
                                          + table + "\n")
    plot(rows, RESULTS / "bench_sim.png")
    print(table)
    print(f"\nwrote {RESULTS / 'bench_sim.json'}, bench_sim.md, bench_sim.png")


if __name__ == "__main__":
    main()
