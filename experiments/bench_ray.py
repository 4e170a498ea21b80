"""What running a plan on Ray costs: the local executor vs the Ray executor on 2 Ray nodes, same plan, one run.

    PYTHONPATH=. .venv/bin/python experiments/bench_ray.py [--queries 6] [--repeats 3] [--model smollm2-135m-llamacpp]

Workload: the latency benchmark's compound MMLU queries (experiments/bench_latency.py `workload`, gold
decomposition, routed by the real router). The experts are split over two model aliases with the same weights
(`default`: law, medicine; `second`: the rest), so the plan has two models; for Ray each model's
load/generate/evict steps are placed on its own node (`default` -> n0, `second` -> n1), as the `place` pass would.
The 2 Ray nodes are a `ray.cluster_utils.Cluster` on this one machine (1 CPU each): **both share this machine's
CPU** (2 cores, shared with other jobs), so the Ray wall time is not a scale-out result, only the overhead is.

Two measurements per repeat, executors alternating (order rotated every repeat):
* overhead: the `level` policy (one step at a time, plan order), so no step waits for another. Per generate step,
  overhead = step wall time in the coordinator - the backend's own call time (`Generation.seconds`, measured
  where the model runs: in this process, or inside the actor). Ray's extra cost per step is its overhead minus the
  local executor's on the same step (medians over repeats); `ray_overhead_frac` = that / the Ray step's wall time,
  median over steps of >= 1 s.
* wall: the `compiled` policy (eager dataflow): the whole batch, local (one process) vs Ray (two actors).
Answers must agree between the executors (same plan, greedy). Loads (actor start + model load) are reported
separately, from the first repeat. The summary also carries `sim_place_vs_round_robin` and `sim_place_gap` from
experiments/results/bench_cluster_sim.json (the simulator's result; null when that file does not exist).
Writes experiments/results/bench_ray.json (after every measurement) and bench_ray.md. `--summarize-only` recomputes
the summary from the stored runs (e.g. to pick up bench_cluster_sim.json once it exists).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
sys.path.insert(0, str(ROOT / "experiments"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from bench_latency import compose, workload  # noqa: E402

from compiler import compile  # noqa: E402
from compiler.plan import Plan, StepKind  # noqa: E402
from compllm.frontend.decomposer import Decomposition  # noqa: E402
from compllm.runtime.executor import LiveRun  # noqa: E402

SECOND = ("economics", "science", "math", "general")  # experts moved to the `second` alias
NODES = {"default": "n0", "second": "n1"}
MIB = 2**20


class Timed:
    """Mixin: remember, per generate step, the backend's own call time (the longest of its generations')."""

    def _call(self, step, requests, policies, on_text):
        outcomes = super()._call(step, requests, policies, on_text)
        secs = [o.generation.seconds for o in outcomes if o.ok]
        self.model_s[step.id] = max(secs) if secs else None
        return outcomes


def run_local(plan: Plan, ctx, graph, barrier: bool):
    class Run(Timed, LiveRun):
        pass

    run = Run(ctx, barrier=barrier)
    run.model_s = {}
    return _drive(run, plan, graph)


def run_ray(executor, plan: Plan, ctx, graph, barrier: bool):
    from compllm.runtime.ray_executor import RayRun

    class Run(Timed, RayRun):
        pass

    run = Run(ctx, executor.replicas, barrier=barrier, check=executor.check_placement)
    run.model_s = {}
    return _drive(run, plan, graph)


def _drive(run, plan, graph):
    start = time.perf_counter()
    run.submit(plan.steps, plan.graph, plan.aliases)
    run.close()
    run.wait()
    wall = time.perf_counter() - start
    results = run.finish(graph)
    steps = {r.step_id: {"kind": r.kind, "wall_s": r.end - r.start, "model_s": run.model_s.get(r.step_id),
                         "worker": r.worker} for r in run.records}
    return {"wall_s": wall, "steps": steps, "answers": {k: r.answer for k, r in results.items()},
            "failed": sorted(k for k, r in results.items() if not r.ok)}


def placed(plan: Plan) -> Plan:
    import dataclasses

    return dataclasses.replace(plan, steps=[
        dataclasses.replace(s, node=NODES[s.model]) if s.model in NODES and
        s.kind in (StepKind.LOAD, StepKind.GENERATE, StepKind.EVICT) else s for s in plan.steps])


def sim_summary() -> dict:
    path = RESULTS / "bench_cluster_sim.json"
    if not path.exists():
        return {"sim_place_vs_round_robin": None, "sim_place_gap": None, "sim_source": None}
    summary = json.loads(path.read_text()).get("summary") or {}
    return {"sim_place_vs_round_robin": summary.get("sim_place_vs_round_robin"),
            "sim_place_gap": summary.get("sim_place_gap"), "sim_source": str(path.relative_to(ROOT))}


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def summarize(record: dict) -> dict:
    runs = record["runs"]

    def of(executor, mode):
        return [r for r in runs if r["executor"] == executor and r["mode"] == mode]

    per_step = []
    gen_ids = sorted({sid for r in of("local", "overhead") for sid, s in r["steps"].items() if s["kind"] == "generate"})
    for sid in gen_ids:
        row = {"step": sid}
        for ex in ("local", "ray"):
            rows = [r["steps"][sid] for r in of(ex, "overhead") if sid in r["steps"]]
            row[f"{ex}_wall_s"] = med([s["wall_s"] for s in rows])
            row[f"{ex}_model_s"] = med([s["model_s"] for s in rows])
            row[f"{ex}_overhead_ms"] = med([(s["wall_s"] - s["model_s"]) * 1000 for s in rows
                                            if s["model_s"] is not None])
        if row["ray_overhead_ms"] is not None and row["local_overhead_ms"] is not None:
            row["ray_extra_ms"] = row["ray_overhead_ms"] - row["local_overhead_ms"]
            row["ray_extra_frac"] = row["ray_extra_ms"] / 1000 / row["ray_wall_s"] if row["ray_wall_s"] else None
        per_step.append(row)
    long_steps = [r for r in per_step if r.get("ray_wall_s") and r["ray_wall_s"] >= 1.0 and "ray_extra_ms" in r]
    walls = {ex: med([r["wall_s"] for r in of(ex, "wall")]) for ex in ("local", "ray")}
    agree = all(r["answers"] == runs[0]["answers"] for r in runs)
    summary = {
        "queries": record["queries"], "repeats": record["repeats"], "generate_steps": len(gen_ids),
        "steps_ge_1s": len(long_steps),
        "ray_overhead_ms_median": med([r.get("ray_extra_ms") for r in per_step]),
        "ray_overhead_ms_median_ge_1s": med([r["ray_extra_ms"] for r in long_steps]),
        "ray_overhead_frac": med([r["ray_extra_frac"] for r in long_steps]),
        "local_step_overhead_ms_median": med([r.get("local_overhead_ms") for r in per_step]),
        "ray_step_overhead_ms_median": med([r.get("ray_overhead_ms") for r in per_step]),
        "wall_local_s": walls["local"], "wall_ray_2nodes_s": walls["ray"],
        "wall_ray_over_local": walls["ray"] / walls["local"] if walls["local"] and walls["ray"] else None,
        "answers_agree": agree,
        "failed_nodes": sorted({n for r in runs for n in r["failed"]}),
        **sim_summary(),
    }
    record["per_step"] = per_step
    return summary


def table(record: dict) -> str:
    s = record["summary"]
    f = lambda v, p=1: "n/a" if v is None else f"{v:.{p}f}"  # noqa: E731
    lines = [
        f"# Ray executor overhead ({record['model']}, {s['queries']} queries, {s['repeats']} repeats, medians)",
        "",
        f"Command: `{record['command']}`",
        "",
        "Both Ray nodes are processes on this one machine (2 shared cores, other jobs running): the wall times",
        "compare executors on the same CPU, not a scale-out.",
        "",
        "| measure | local executor | Ray, 2 nodes |",
        "|---|---|---|",
        f"| batch wall time, `compiled` policy (s) | {f(s['wall_local_s'], 2)} | {f(s['wall_ray_2nodes_s'], 2)} |",
        f"| per generate step: wall - model time (ms) | {f(s['local_step_overhead_ms_median'])} | "
        f"{f(s['ray_step_overhead_ms_median'])} |",
        "",
        f"Ray's extra cost per generate step: median {f(s['ray_overhead_ms_median'])} ms over {s['generate_steps']} "
        f"steps; {f(s['ray_overhead_ms_median_ge_1s'])} ms over the {s['steps_ge_1s']} steps of >= 1 s, "
        f"**ray_overhead_frac = {f(s['ray_overhead_frac'], 4)}** of their step time. Answers agree: "
        f"{s['answers_agree']}. Load steps in the first repeat (s): local {record.get('local_load_s', 'n/a')}, Ray (actor "
        f"start + model load) {record.get('ray_load_s', 'n/a')}; starting the 2-node Ray cluster: {record['ray_start_s']} s.",
        "",
        "Overhead = a step's wall time in the coordinator minus the backend's own call time, measured where the model "
        "runs (this process, or inside the actor): it is what the executor adds (prompt building, retry wrapper, and "
        "for Ray the actor call, serialization and result transfer), not differences in compute speed.",
        "",
        f"Simulated cluster (from {s['sim_source'] or 'bench_cluster_sim.json: not present'}): "
        f"place vs round-robin makespan {s['sim_place_vs_round_robin']}, place's gap to its lower bound "
        f"{s['sim_place_gap']}.",
        "",
        "| step | local wall s | local model s | local overhead ms | Ray wall s | Ray model s | Ray overhead ms | Ray extra ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in record["per_step"]:
        lines.append(f"| {r['step']} | {f(r['local_wall_s'], 3)} | {f(r['local_model_s'], 3)} | "
                     f"{f(r['local_overhead_ms'])} | {f(r['ray_wall_s'], 3)} | {f(r['ray_model_s'], 3)} | "
                     f"{f(r['ray_overhead_ms'])} | {f(r.get('ray_extra_ms'))} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--queries", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model", default="smollm2-135m-llamacpp")
    ap.add_argument("--override", nargs="*", default=[])
    ap.add_argument("--out", default=str(RESULTS / "bench_ray"))
    ap.add_argument("--summarize-only", action="store_true",
                    help="recompute the summary and table from the JSON's runs (e.g. once bench_cluster_sim.json exists)")
    args = ap.parse_args()
    out = Path(args.out)
    if args.summarize_only:
        record = json.loads(out.with_suffix(".json").read_text())
        record["summary"] = summarize(record)
        out.with_suffix(".json").write_text(json.dumps(record, indent=1))
        out.with_suffix(".md").write_text(table(record))
        print(json.dumps(record["summary"], indent=1))
        return

    import ray
    from omegaconf import OmegaConf, open_dict
    from ray.cluster_utils import Cluster

    from compllm.apps.build import build_pipeline
    from compllm.runtime.ray_executor import RayClusterConfig, RayExecutor

    cfg = compose([f"model={args.model}", "auto_calibrate=false", "show_progress=false", *args.override])
    with open_dict(cfg):
        cfg.models.second = copy.deepcopy(cfg.models.default)
        for name in SECOND:
            if name in cfg.experts:
                cfg.experts[name].model = "second"
    pipeline = build_pipeline(cfg)
    pipeline.prepare()
    items = workload(args.queries)
    decompositions = [Decomposition(text, tuple(subs), False) for text, subs in items]
    graph = pipeline.build(decompositions, pipeline.route(decompositions))
    plans = {}
    for policy in ("level", "compiled"):
        pcfg = compose([f"model={args.model}", f"policy={policy}", *args.override])
        plans[policy] = compile(graph, pipeline.cost, OmegaConf.to_object(pcfg.compiler), resident={})
    models = sorted({s.model for s in plans["compiled"].steps if s.kind is StepKind.GENERATE})

    started = time.perf_counter()
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "resources": {"n0": 1}, "object_store_memory": 80 * MIB, "include_dashboard": False})
    cluster.add_node(num_cpus=1, resources={"n1": 1}, object_store_memory=80 * MIB)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, namespace="compllm-bench", log_to_driver=False)
    ray_start = time.perf_counter() - started
    executor = RayExecutor("level", cluster=RayClusterConfig())
    record = {
        "model": cfg.models.default.name, "queries": args.queries, "nodes": len(graph), "repeats": args.repeats,
        "command": "PYTHONPATH=. .venv/bin/python experiments/bench_ray.py " + " ".join(sys.argv[1:]),
        "models": models, "placement": NODES,
        "plan": {p: {"steps": len(pl.steps), "generate_steps": pl.count(StepKind.GENERATE)} for p, pl in plans.items()},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "ray": ray.__version__, "load_average_start": os.getloadavg()},
        "ray_start_s": round(ray_start, 2), "runs": [],
    }
    try:
        for rep in range(args.repeats):
            order = ["local", "ray"] if rep % 2 == 0 else ["ray", "local"]
            for mode, policy in (("overhead", "level"), ("wall", "compiled")):
                for ex in order:
                    ctx = pipeline.context()
                    if ex == "local":
                        got = run_local(plans[policy], ctx, graph, barrier=policy == "level")
                    else:
                        got = run_ray(executor, placed(plans[policy]), ctx, graph, barrier=policy == "level")
                    got.update(repeat=rep, executor=ex, mode=mode, policy=policy, load_average=os.getloadavg()[0])
                    if rep == 0 and mode == "overhead":
                        loads = {sid: round(s["wall_s"], 2) for sid, s in got["steps"].items() if s["kind"] == "load"}
                        record[f"{ex}_load_s"] = loads
                    record["runs"].append(got)
                    out.with_suffix(".json").write_text(json.dumps(record, indent=1))
                    print(f"rep {rep} {mode:8s} {ex:5s} wall {got['wall_s']:.2f}s failed={len(got['failed'])}",
                          flush=True)
    finally:
        executor.shutdown()
        ray.shutdown()
        cluster.shutdown()
    record["summary"] = summarize(record)
    out.with_suffix(".json").write_text(json.dumps(record, indent=1))
    out.with_suffix(".md").write_text(table(record))
    print(table(record))


if __name__ == "__main__":
    main()
