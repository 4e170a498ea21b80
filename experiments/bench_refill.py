"""Continuous refill vs separate calls on the same nodes: the first level of `bench_latency`'s workload.

    .venv/bin/python experiments/bench_refill.py [--queries 20] [--slots 8 16] [--model qwen2.5-coder-0.5b]

The first-level nodes (no parents: every MMLU sub-query) of `bench_latency.workload`, compiled as usual with
`compiler.max_call_size=null` (calls of at most `max_batch_size`), run call by call; then the same requests as
one call with `max_live_rows` = each `--slots` value (rows join as others finish). Same loaded weights, one
process. Reports wall seconds and how many answers equal the separate calls' answers.
Writes experiments/results/bench_refill.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench_latency import RESULTS, compose, workload  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--queries", type=int, default=20)
    ap.add_argument("--slots", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    args = ap.parse_args()

    from compllm.apps.build import build_pipeline
    from compllm.frontend.decomposer import Decomposition

    cfg = compose([f"model={args.model}", "compiler.max_call_size=null"])
    pipeline = build_pipeline(cfg)
    pipeline.prepare()
    decompositions = [Decomposition(text, tuple(subs), False) for text, subs in workload(args.queries)]
    graph = pipeline.build(decompositions, pipeline.route(decompositions))
    plan = pipeline.compile(graph)
    ctx = pipeline.context()
    steps = [s for s in plan.steps if s.nodes and not any(graph.nodes[n].parents for n in s.nodes)]
    model = pipeline.pool.get(steps[0].model)
    nodes = [n for s in steps for n in s.nodes]
    requests = {n: ctx.request(graph, graph.nodes[n], {}) for n in nodes}

    start = time.perf_counter()
    separate = {}
    for s in steps:
        for n, gen in zip(s.nodes, model.generate([requests[n] for n in s.nodes])):
            separate[n] = gen.text
    rows = [{"run": f"{len(steps)} calls of <= {pipeline.compiler_config.max_batch_size}",
             "wall_s": time.perf_counter() - start, "same_answers": len(nodes)}]
    for slots in args.slots:
        start = time.perf_counter()
        gens = model.generate([requests[n] for n in nodes], max_live_rows=slots)
        rows.append({"run": f"1 call, {slots} rows at a time", "wall_s": time.perf_counter() - start,
                     "same_answers": sum(separate[n] == g.text for n, g in zip(nodes, gens))})
    base = rows[0]["wall_s"]
    name = cfg.models.default.name
    table = [f"{len(nodes)} first-level nodes of {args.queries} bench_latency queries, model {name}\n",
             "| run | wall s | speedup | answers = separate calls |", "|---|---|---|---|"]
    table += [f"| {r['run']} | {r['wall_s']:.1f} | {base / r['wall_s']:.2f}x | {r['same_answers']}/{len(nodes)} |"
              for r in rows]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "bench_refill.json").write_text(json.dumps({"model": name, "nodes": len(nodes), "rows": rows}, indent=1))
    (RESULTS / "bench_refill.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    sys.exit(main())
