"""Latency of sub-query processing: sequential vs level vs compiled, same models, same graph, one run.

    .venv/bin/python experiments/bench_latency.py [--queries 20] [--repeats 3] [--model qwen2.5-coder-0.5b]

Workload: compound queries joining 3 MMLU questions from distinct domains (law, medicine, economics,
science/math); every third query adds a 4th sub-query that depends on the 1st ("In one sentence, why is
#1 right?"). The sub-queries are given (gold decomposition) and routed by the real router, so every policy
executes the identical graph on the identical loaded weights: only scheduling differs.

Measured per policy and repeat: wall time of executing the whole batch, each query's latency (execute
start -> its final answer). Reported: medians over repeats, speedups vs sequential from the same run, the
critical-path lower bound from measured node times (the longest dependency chain of sequential node
times: what infinite parallelism without batching could reach), the work bound (every prompt and output
token at the best measured kernel speed: what this machine must compute at least), and answer agreement
between policies.
Writes experiments/results/bench_latency.json (after every measurement, so a killed run keeps its data)
and bench_latency.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from compiler.build import node_id  # noqa: E402
from compiler.levels import topo_order  # noqa: E402
from compiler.plan import StepKind  # noqa: E402
from compllm.data.mmlu import by_domain  # noqa: E402
from compllm.frontend.decomposer import Decomposition  # noqa: E402
from compllm.frontend.parse import SubQuery  # noqa: E402


def workload(n: int, seed: int = 0) -> list[tuple[str, list[SubQuery]]]:
    rng = random.Random(seed)
    pools = by_domain()
    domains = sorted(pools)
    queries = []
    for i in range(n):
        picked = rng.sample(domains, 3)
        subs = [SubQuery(k + 1, rng.choice(pools[d]).prompt(), ()) for k, d in enumerate(picked)]
        if i % 3 == 2:
            subs.append(SubQuery(4, "In one sentence, why is #1 the right answer to the first question?", (1,)))
        text = " Also: ".join(s.text for s in subs[:3])
        queries.append((text, subs))
    return queries


def critical_path(graph, node_seconds: dict[str, float]) -> float:
    finish: dict[str, float] = {}
    for nid in topo_order(graph):
        node = graph.nodes[nid]
        finish[nid] = max((finish[p] for p in node.parents), default=0.0) + node_seconds.get(nid, 0.0)
    return max(finish.values(), default=0.0)


def best_kernels(pipeline, plan) -> dict:
    """The fastest measured kernels of the (single) expert model: seconds per prompt token, and per row and
    decode step at the batch size where that is cheapest (from its calibration; roofline if uncalibrated)."""
    pipeline.prepare()
    cost = pipeline.cost
    (model,) = {s.model for s in plan.steps if s.kind is StepKind.GENERATE}
    mc = cost.cost(model)
    table = {int(b): float(v) for b, v in (mc.decode_step_s_by_batch or {"1": mc.decode_s_per_token}).items()}
    batch = min(table, key=lambda b: table[b] / b)
    return {"model": model, "prefill_s_per_token": mc.prefill_s_per_token,
            "decode_s_per_row_step": table[batch] / batch, "at_batch": batch}


def work_bound(run: dict, kernels: dict, compiled_away: list[str]) -> float:
    """Seconds the machine must compute at least: every prompt token at the best prefill speed and every
    output token at the best per-row decode cost (nodes the compiler removed excluded)."""
    skip = set(compiled_away)
    return sum(p * kernels["prefill_s_per_token"] + o * kernels["decode_s_per_row_step"]
               for nid, (p, o) in run["tokens"].items() if nid not in skip)


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from compllm.config.schema import register

    register()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose("config", overrides=overrides)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--queries", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--policies", nargs="+", default=["sequential", "level", "compiled"])
    ap.add_argument("--override", nargs="*", default=[], help="extra Hydra overrides, e.g. compiler.max_batch_size=4")
    ap.add_argument("--out", default=str(RESULTS / "bench_latency"))
    args = ap.parse_args()

    from omegaconf import OmegaConf
    from tqdm import tqdm

    from compllm.apps.build import build_pipeline, build_policy

    cfg = compose([f"model={args.model}", *args.override])
    pipeline = build_pipeline(cfg)
    pipeline.prepare()  # every policy uses these same loaded weights
    items = workload(args.queries)
    decompositions = [Decomposition(text, tuple(subs), False) for text, subs in items]
    graph = pipeline.build(decompositions, pipeline.route(decompositions))
    plan = pipeline.compile(graph)
    kernels = best_kernels(pipeline, plan)
    policies, plans = {}, {}
    for name in args.policies:  # each policy is a plan of its own (sequential: one node per call)
        policy_cfg = compose([f"model={args.model}", f"policy={name}", *args.override])
        policies[name] = build_policy(policy_cfg)
        pipeline.compiler_config = OmegaConf.to_object(policy_cfg.compiler)
        plans[name] = pipeline.compile(graph)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "model": cfg.models.default.name, "queries": args.queries, "nodes": len(graph), "repeats": args.repeats,
        "plan": {"steps": len(plan.steps), "generate_steps": sum(1 for s in plan.steps if s.nodes),
                 "deduped": len(plan.aliases)},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "kernels": kernels, "compiled_away": sorted(plan.aliases),
        "runs": [],
    }
    total = args.repeats * len(policies)
    with tqdm(total=total, desc="policy runs", unit="run") as bar:
        for rep in range(args.repeats):
            names = list(policies)
            names = names[rep % len(names):] + names[: rep % len(names)]  # rotate order: no policy always first
            for name in names:
                ctx = pipeline.context()
                start = time.perf_counter()
                results = policies[name].run(plans[name], ctx, graph)
                wall = time.perf_counter() - start
                latency = {q.id: results[q.sink].end for q in graph.queries.values()}
                record["runs"].append({
                    "repeat": rep, "policy": name, "wall_s": wall, "latency_s": latency,
                    "node_s": {nid: r.end - r.start for nid, r in results.items()},
                    "tokens": {nid: [r.prompt_tokens, r.output_tokens] for nid, r in results.items()},
                    "answers": {nid: r.answer for nid, r in results.items()},
                    "failed": [nid for nid, r in results.items() if not r.ok],
                })
                out.with_suffix(".json").write_text(json.dumps(record, indent=1))
                bar.update(1)
    summary = summarize(record, graph)
    record["summary"] = summary
    out.with_suffix(".json").write_text(json.dumps(record, indent=1))
    out.with_suffix(".md").write_text(summary["table"] + "\n")
    print(summary["table"])


def summarize(record: dict, graph) -> dict:
    runs = record["runs"]
    by_policy: dict[str, list[dict]] = {}
    for r in runs:
        by_policy.setdefault(r["policy"], []).append(r)
    seq = by_policy.get("sequential", [])
    # Critical-path bound: each node at its measured sequential (batch-1) duration, infinite parallelism.
    bound = statistics.median(critical_path(graph, r["node_s"]) for r in seq) if seq else None
    # Machine bound: the critical path assumes unlimited parallel compute; on this machine the work itself,
    # at the best measured kernel speeds, takes at least `work` (the same answers, so the same tokens).
    work = statistics.median(work_bound(r, record["kernels"], record["compiled_away"]) for r in seq) \
        if seq and "kernels" in record else None
    machine = max(bound, work) if bound is not None and work is not None else None
    if work is not None and any(r["wall_s"] < work for r in runs):
        print(f"warning: a run took less than the work bound ({work:.1f} s): this machine's calibration is slower "
              "than its kernels; rerun `compllm task=calibrate` on a quiet machine", file=sys.stderr)
    rows, stats = [], {}
    for name, rs in by_policy.items():
        wall = statistics.median(r["wall_s"] for r in rs)
        per_query = statistics.median(statistics.median(r["latency_s"].values()) for r in rs)
        stats[name] = {"wall_s": wall, "median_query_latency_s": per_query}
    base = stats.get("sequential")
    reference = by_policy.get("sequential", runs)[0]["answers"]
    for name, s in stats.items():
        answers = by_policy[name][0]["answers"]
        agree = sum(answers[k] == v for k, v in reference.items()) / max(len(reference), 1)
        s["agreement_with_sequential"] = agree
        s["speedup_wall"] = base["wall_s"] / s["wall_s"] if base else None
        s["speedup_latency"] = base["median_query_latency_s"] / s["median_query_latency_s"] if base else None
        s["vs_critical_path"] = s["wall_s"] / bound if bound else None
        s["vs_machine_bound"] = s["wall_s"] / machine if machine else None
        rows.append(f"| {name} | {s['wall_s']:.1f} | {s['median_query_latency_s']:.1f} | "
                    f"{s['speedup_wall']:.2f}x | {s['speedup_latency']:.2f}x | "
                    f"{(s['vs_critical_path'] or 0):.2f} | {(s['vs_machine_bound'] or 0):.2f} | {agree:.0%} |")
    kernels = record.get("kernels")
    work_note = (f"; work bound {work:.1f} s (prompt tokens x {kernels['prefill_s_per_token'] * 1e3:.1f} ms + "
                 f"output tokens x {kernels['decode_s_per_row_step'] * 1e3:.1f} ms, the best measured per-row "
                 f"decode step, at batch {kernels['at_batch']})") if work is not None else ""
    head = (f"{record['queries']} queries, {record['nodes']} nodes, model {record['model']}, "
            f"median of {record['repeats']} repeats; critical-path bound {bound:.1f} s{work_note}\n\n"
            "| policy | batch wall s | median query latency s | speedup (wall) | speedup (latency) | "
            "wall / critical path | wall / max(critical path, work) | answers = sequential |\n"
            "|---|---|---|---|---|---|---|---|")
    return {"policies": stats, "critical_path_bound_s": bound, "work_bound_s": work, "machine_bound_s": machine,
            "table": head + "\n" + "\n".join(rows)}


if __name__ == "__main__":
    sys.exit(main())
