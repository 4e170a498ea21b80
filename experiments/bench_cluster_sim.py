"""Simulated scale-out: the `place` pass vs round-robin vs one-replica-per-expert on a simulated GPU cluster.

    PYTHONPATH=. .venv/bin/python experiments/bench_cluster_sim.py [--queries 10000] [--nodes 8] [--devices 8]
        [--scenarios mix even]

Cluster: `--nodes` x `--devices` H100s of 80 GB (8 x 8: conf/cluster/h100_8x8.yaml, the `cluster=` config the
compiler places on). Workload:
`compiler.synthetic.random_graph` queries (2-6 sub-queries, random deps, ~15% shared texts, half of the final
answers written by the aggregator) routed uniformly to 64 experts, each its own model of 7B-70B parameters
(sizes per scenario, see SIZES; fp8 weights, bf16 KV cache, GQA with 8 KV heads as Llama-3/Qwen2.5 have), the aggregator on the
8B-class expert model. Costs: `ModelCost.roofline` with H100 SXM numbers (3.35 TB/s HBM, 60% of 989 dense bf16
TFLOP/s), 5 ms per call, 150 prompt tokens of template per call, loads at 10 GB/s, batch_alpha 0.02 (as
experiments/bench_sim.py). Calls: up to 32 rows decoding at once, 128 nodes per call.
Every placement compiles the same graph with the same batches (the passes before `place` are identical), so
the lower bound is shared: max(critical path, total generate seconds / devices, bytes read / (devices x
bandwidth), memory bound); the critical path is the plan's (load + calls along the longest dependency chain);
the memory bound (`compiler.simulate.memory_bound`) adds to the work the idle time memory forces: every device
waits for its first load, and a 70B replica fills its device, so nothing computes there while it loads.
Writes experiments/results/bench_cluster_sim.{json,md,png}; `summary` (of the first scenario, `mix`):
`sim_place_vs_round_robin` is round-robin's makespan / place's, `sim_place_gap` place's makespan over the lower
bound, minus 1 (a fraction). The `even` scenario is reported beside it (see SIZES).
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from compiler import CompilerConfig, CostModel, ModelCost, compile  # noqa: E402
from compiler.cluster import ClusterSpec, uniform_cluster  # noqa: E402
from compiler.simulate import simulate  # noqa: E402
from compiler.synthetic import random_graph  # noqa: E402

RESULTS = ROOT / "experiments" / "results"
MEMORY = 80 * 10**9
BANDWIDTH = 3.35e12
FLOPS = 0.6 * 989e12
N_EXPERTS = 64
POLICIES = [("place (demand)", "demand"), ("one replica per expert", "one_per_expert"),
            ("round-robin", "round_robin")]


def layers_for(params: float) -> int:
    """Depth of the nearest real family (Llama-3 8B: 32, Qwen2.5 14B: 48, 32B: 64, Llama-3 70B: 80)."""
    for limit, layers in ((10e9, 32), (20e9, 48), (40e9, 64)):
        if params < limit:
            return layers
    return 80


#: Expert sizes (billions of parameters) by scenario. `mix`: what expert pools look like (mostly 7-14B
#: fine-tunes, some 32B, a few 70B): 24 x 7-8B, 20 x 13-14B, 12 x 32-34B, 8 x 70-72B. `even`: evenly spaced
#: 7..70B, the hard case (half the experts are >= 40B, and each of those needs an 80 GB device of its own).
SIZES = {
    "mix": [7.0, 7.6, 8.0] * 8 + [13.0, 14.0, 14.8, 13.5] * 5 + [32.0, 32.8, 34.0] * 4 + [70.0, 72.0] * 4,
    "even": [7 + 63 * i / (N_EXPERTS - 1) for i in range(N_EXPERTS)],
}


def cost_model(scenario: str = "mix") -> CostModel:
    models = {}
    for i, billions in enumerate(SIZES[scenario]):
        params = billions * 1e9
        models[f"m{i:02d}-{params / 1e9:.0f}b"] = ModelCost.roofline(int(params), 1, layers_for(params), 8, 128,
                                                                    BANDWIDTH, FLOPS, call_overhead_s=0.005)
    aliases = list(models)
    experts = {f"e{i:02d}": aliases[i] for i in range(N_EXPERTS)}
    experts["aggregator"] = aliases[1]
    return CostModel(models, experts, batch_alpha=0.02, prompt_overhead_tokens=150, load_bytes_per_s=10e9)


def run(queries: int, nodes: int, devices: int, seed: int, scenario: str = "mix") -> dict:
    cm = cost_model(scenario)
    experts = [e for e in cm.expert_model if e != "aggregator"]
    start = time.perf_counter()
    graph = random_graph(random.Random(seed), experts, n_queries=queries, shared_pool=max(8, queries // 50))
    graph_s = time.perf_counter() - start
    cluster = load_cluster(nodes, devices)
    rows = []
    for label, policy in POLICIES:
        config = CompilerConfig(memory_budget=MEMORY, max_batch_size=32, max_call_size=32, placement=policy,
                                verify=False)
        start = time.perf_counter()
        plan = compile(graph, cm, config, cluster=cluster)
        compile_s = time.perf_counter() - start
        start = time.perf_counter()
        plan.verify(cm, orders=1)
        verify_s = time.perf_counter() - start
        start = time.perf_counter()
        sim = simulate(plan, cm, bandwidth_Bps=BANDWIDTH)
        sim_s = time.perf_counter() - start
        replicas = sum(1 for s in plan.steps if s.kind.value == "load")
        busy = sorted(sim.device_busy_s.values())
        rows.append({
            "placement": label, "policy": policy, "nodes": len(graph), "compiled_nodes": len(plan.graph),
            "generates": sim.generates, "loads": sim.loads, "evictions": sim.evictions, "replica_loads": replicas,
            "models_replicated": len({s.model for s in plan.steps if s.kind.value == "load"}),
            "makespan_s": sim.makespan_s, "critical_path_s": sim.critical_path_s,
            "work_bound_s": sim.work_bound_s, "bytes_read_bound_s": sim.bytes_read_bound_s,
            "memory_bound_s": sim.memory_bound_s,
            "plan_lower_bound_s": max(sim.critical_path_s, sim.work_bound_s, sim.bytes_read_bound_s,
                                      sim.memory_bound_s),
            "compute_utilisation": sim.compute_utilisation,
            "device_busy_min_s": busy[0], "device_busy_median_s": busy[len(busy) // 2], "device_busy_max_s": busy[-1],
            "peak_device_reserved_GB": sim.peak_resident_bytes / 1e9,
            "compile_s": compile_s, "verify_s": verify_s, "simulate_s": sim_s,
            "est_finish_s": plan.graph.annotations["placement"].est_finish_s,
        })
        print(f"{label:<24} makespan {sim.makespan_s:8.1f} s  crit {sim.critical_path_s:7.1f}  work/D "
              f"{sim.work_bound_s:7.1f}  loads {sim.loads:3d}  util {sim.compute_utilisation:.0%}  "
              f"({compile_s:.1f} s compile, {verify_s:.1f} s verify, {sim_s:.1f} s sim)", file=sys.stderr)
    # One bound for all: the same batches (work and bytes) on the same devices; the critical path through
    # data dependencies plus one load is at least the smallest plan's; the memory bound depends only on the
    # batches, the footprints and the devices (the smallest plan's, to be safe).
    bound = max(min(r["critical_path_s"] for r in rows), rows[0]["work_bound_s"], rows[0]["bytes_read_bound_s"],
                min(r["memory_bound_s"] for r in rows))
    for r in rows:
        r["lower_bound_s"] = bound
        r["gap"] = r["makespan_s"] / bound - 1
    by = {r["policy"]: r for r in rows}
    return {"graph_s": graph_s, "rows": rows, "lower_bound_s": bound, "summary": {
        "sim_place_vs_round_robin": by["round_robin"]["makespan_s"] / by["demand"]["makespan_s"],
        "sim_place_vs_one_per_expert": by["one_per_expert"]["makespan_s"] / by["demand"]["makespan_s"],
        "sim_place_gap": by["demand"]["gap"],
    }}


def load_cluster(nodes: int, devices: int) -> ClusterSpec:
    """The simulated cluster from its config (conf/cluster/h100_8x8.yaml) when that is the size asked for."""
    if (nodes, devices) == (8, 8):
        from omegaconf import OmegaConf

        spec = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ClusterSpec),
                                                   OmegaConf.load(ROOT / "conf" / "cluster" / "h100_8x8.yaml")))
        assert len(spec.devices()) == 64 and spec.nodes[0].memory_per_device == MEMORY
        return spec
    return uniform_cluster(nodes, devices, MEMORY)


def markdown(results: dict, args: argparse.Namespace) -> str:
    head = ["placement", "makespan s", "lower bound s", "gap", "crit. path s", "work/devices s", "memory s",
            "bytes/BW s",
            "loads", "evictions", "compute util", "device busy min/med/max s", "peak device GB", "compile s"]
    out = [f"# Simulated cluster: {args.nodes} nodes x {args.devices} H100 80 GB, {N_EXPERTS} experts of 7-70B, "
           f"{args.queries} queries (experiments/bench_cluster_sim.py)\n",
           f"Command: `{command(args)}`\n"]
    for scenario, result in results.items():
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in result["rows"]:
            cells = [r["placement"], f"{r['makespan_s']:.1f}", f"{r['lower_bound_s']:.1f}",
                     f"{100 * r['gap']:.1f}%", f"{r['critical_path_s']:.1f}", f"{r['work_bound_s']:.1f}",
                     f"{r['memory_bound_s']:.1f}",
                     f"{r['bytes_read_bound_s']:.1f}", r["loads"], r["evictions"],
                     f"{100 * r['compute_utilisation']:.0f}%",
                     f"{r['device_busy_min_s']:.0f} / {r['device_busy_median_s']:.0f} / {r['device_busy_max_s']:.0f}",
                     f"{r['peak_device_reserved_GB']:.1f}", f"{r['compile_s']:.1f}"]
            lines.append("| " + " | ".join(map(str, cells)) + " |")
        s = result["summary"]
        out += [f"## Experts `{scenario}`: {SCENARIO_TEXT[scenario]}\n", "\n".join(lines) + "\n",
                f"round-robin makespan / place's: **{s['sim_place_vs_round_robin']:.2f}x**; one replica per expert "
                f"/ place's: {s['sim_place_vs_one_per_expert']:.2f}x; place's makespan over the lower bound: "
                f"**+{100 * s['sim_place_gap']:.1f}%**.\n"]
    return "\n".join(out)


def plot(results: dict, path: Path, title: str) -> None:
    import matplotlib  # a project dependency

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.2), squeeze=False)
    for ax, (scenario, result) in zip(axes[0], results.items()):
        rows = result["rows"]
        xs = range(len(rows))
        ax.bar(list(xs), [r["makespan_s"] for r in rows], 0.5, label="simulated makespan")
        ax.axhline(result["lower_bound_s"], color="k", linestyle="--", label="lower bound")
        for x, r in zip(xs, rows):
            ax.text(x, r["makespan_s"], f"{r['makespan_s']:.0f} s\n{100 * r['compute_utilisation']:.0f}% busy",
                    ha="center", va="bottom", fontsize=8)
        ax.set_xticks(list(xs), [r["placement"] for r in rows], fontsize=8)
        ax.set_ylabel("seconds")
        ax.set_ylim(0, max(r["makespan_s"] for r in rows) * 1.25)
        ax.set_title(f"{title}\nexperts: {scenario}", fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


SCENARIO_TEXT = {
    "mix": "24 x 7-8B, 20 x 13-14B, 12 x 32-34B, 8 x 70-72B (fp8 weights)",
    "even": "evenly spaced 7..70B (half of them >= 40B: each replica of those fills an 80 GB device)",
}


def command(args: argparse.Namespace) -> str:
    return (f"PYTHONPATH=. .venv/bin/python experiments/bench_cluster_sim.py --queries {args.queries} --nodes "
            f"{args.nodes} --devices {args.devices} --seed {args.seed} --scenarios {' '.join(args.scenarios)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=10000)
    parser.add_argument("--nodes", type=int, default=8)
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scenarios", nargs="+", choices=sorted(SIZES), default=["mix", "even"],
                        help="expert sizes (see SIZES); the summary is the first one's")
    parser.add_argument("--out", default="bench_cluster_sim", help="results file name (no extension)")
    args = parser.parse_args()
    results = {}
    for scenario in args.scenarios:
        print(f"== experts: {scenario}", file=sys.stderr)
        results[scenario] = run(args.queries, args.nodes, args.devices, args.seed, scenario)
    out = {"python": platform.python_version(), "seed": args.seed, "queries": args.queries, "nodes": args.nodes,
           "devices_per_node": args.devices, "memory_per_device_bytes": MEMORY, "bandwidth_Bps": BANDWIDTH,
           "flops": FLOPS, "command": command(args), "summary_scenario": args.scenarios[0],
           "summary": results[args.scenarios[0]]["summary"],
           "scenarios": {sc: {"experts": SCENARIO_TEXT[sc], **res,
                              "models": {a: {"weight_bytes": mc.weight_bytes, "load_s": cm.load_seconds(a)}
                                         for cm in [cost_model(sc)] for a, mc in cm.models.items()},
                              "aggregator_model": cost_model(sc).expert_model["aggregator"]}
                         for sc, res in results.items()}}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(out, indent=2) + "\n")
    table = markdown(results, args)
    (RESULTS / f"{args.out}.md").write_text(table)
    plot(results, RESULTS / f"{args.out}.png", f"{args.nodes}x{args.devices} H100 80 GB, {N_EXPERTS} experts, "
                                               f"{args.queries} queries (simulated)")
    print(table)


if __name__ == "__main__":
    main()
