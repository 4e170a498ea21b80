"""Left-padded batched prefill vs one prompt at a time, on the first calls of `bench_latency`'s plan.

    .venv/bin/python experiments/bench_prefill.py [--queries 20] [--calls 5] [--model qwen2.5-coder-0.5b]

Why: rows joining a refilled call are prefilled as a group (`compiler.cost.admit_rows` waits for half the slots),
and unpadded one-by-one prefill was the alternative to left padding. On 2 CPU cores prefill is compute-bound, so
the question is only which costs less per real token. Each of the first `--calls` first-level calls (of at most
`max_batch_size` nodes, `compiler.max_call_size=null`) is prefilled once padded and once prompt by prompt, after
one warm-up call. Writes experiments/results/bench_prefill.{json,md}.
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
    ap.add_argument("--calls", type=int, default=5)
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    args = ap.parse_args()

    import torch

    from compllm.apps.build import build_pipeline
    from compllm.frontend.decomposer import Decomposition

    cfg = compose([f"model={args.model}", "compiler.max_call_size=null"])
    pipeline = build_pipeline(cfg)
    pipeline.prepare()
    decompositions = [Decomposition(text, tuple(subs), False) for text, subs in workload(args.queries)]
    graph = pipeline.build(decompositions, pipeline.route(decompositions))
    plan = pipeline.compile(graph)
    ctx = pipeline.context()
    steps = [s for s in plan.steps if s.nodes and not any(graph.nodes[n].parents for n in s.nodes)][: args.calls]
    model = pipeline.pool.get(steps[0].model)

    def encode(prompts):
        enc = model.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        return enc["input_ids"], enc["attention_mask"]

    def timed(prompts) -> float:
        ids, mask = encode(prompts)
        start = time.perf_counter()
        model.prefill_ids(ids, mask, range(len(prompts)))
        return time.perf_counter() - start

    rows = []
    with torch.inference_mode():
        for i, step in enumerate(steps):
            prompts = [model.render(ctx.request(graph, graph.nodes[n], {})) for n in step.nodes]
            if i == 0:
                timed(prompts)  # warm-up
            real = int(encode(prompts)[1].sum())
            padded = len(prompts) * encode(prompts)[1].shape[1]
            rows.append({"step": step.id, "rows": len(prompts), "real_tokens": real, "padded_tokens": padded,
                         "padded_s": timed(prompts), "one_by_one_s": sum(timed([p]) for p in prompts)})
    lines = [f"first-level calls of {args.queries} bench_latency queries, model {cfg.models.default.name}\n",
             "| call | rows | real tokens | padded tokens | padded batch s | one by one s | "
             "ms per real token, padded | ms per real token, one by one |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['step']} | {r['rows']} | {r['real_tokens']} | {r['padded_tokens']} | {r['padded_s']:.2f} | "
              f"{r['one_by_one_s']:.2f} | {1e3 * r['padded_s'] / r['real_tokens']:.1f} | "
              f"{1e3 * r['one_by_one_s'] / r['real_tokens']:.1f} |" for r in rows]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "bench_prefill.json").write_text(json.dumps({"model": cfg.models.default.name, "rows": rows}, indent=1))
    (RESULTS / "bench_prefill.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
