"""What reusing a saved prefix costs in the llama.cpp backend, against computing it: restore a saved KV state into a
row's sequence (`llama_state_seq_set_data`, what prefix reuse does per row) vs prefill the same tokens.

    PYTHONPATH=. .venv/bin/python experiments/bench_prefix_restore.py [--model qwen2.5-coder-0.5b-llamacpp]
        [--lengths 32 128 512] [--repeats 5]

Prefixes of a real planner prompt (the decomposer's instructions, ~500 tokens) cut to each length; per length the
median over `--repeats` of: computing it (one `llama_decode` in sequence 0), saving it, restoring it into sequence 1.
Writes experiments/results/bench_prefix_restore.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench_latency import RESULTS, compose  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-llamacpp")
    ap.add_argument("--lengths", type=int, nargs="+", default=[32, 128, 512])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    from compllm.apps.build import build_pipeline
    from compllm.backends.base import GenerationRequest
    from compllm.backends.llamacpp import PREFIX_SEQ, _Row

    pipeline = build_pipeline(compose([f"model={args.model}"]))
    model = pipeline.pool.get(pipeline.decomposer.model)
    model = getattr(model, "inner", model)
    ids = model.tokenize(model.render(pipeline.decomposer.request("What is 15% of 240, and who wrote Hamlet?")))
    rows = []
    for n in args.lengths:
        prefix = ids[:n]
        compute, save, restore = [], [], []
        for _ in range(args.repeats + 1):  # the first round warms up
            scratch = _Row(-1, GenerationRequest(()), prefix)
            scratch.seq, scratch.pos = PREFIX_SEQ, 0
            t0 = time.perf_counter()
            model._run([(scratch, prefix)], None, logits=False)
            t1 = time.perf_counter()
            key = model._save(PREFIX_SEQ, prefix)
            t2 = time.perf_counter()
            model._restore(key, 1, len(prefix))
            t3 = time.perf_counter()
            size = len(model._prefixes.get(key))
            model._clear_rows(keep_prefix=False)
            compute.append(t1 - t0), save.append(t2 - t1), restore.append(t3 - t2)
        med = lambda v: statistics.median(v[1:])  # noqa: E731
        rows.append({"tokens": len(prefix), "compute_s": med(compute), "save_s": med(save), "restore_s": med(restore),
                     "state_bytes": size})
        print(rows[-1], flush=True)
    record = {"command": "PYTHONPATH=. .venv/bin/python experiments/" + " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
              "model": args.model, "threads": model.settings.threads, "load_average": list(os.getloadavg()),
              "rows": rows}
    out = RESULTS / "bench_prefix_restore"
    out.with_suffix(".json").write_text(json.dumps(record, indent=1))
    lines = [f"# Restoring a saved prefix vs computing it (llama.cpp, {args.model})", "", f"`{record['command']}`", "",
             f"Load average at the end: {record['load_average']}; medians of {args.repeats} repeats.", "",
             "| prefix tokens | compute ms | save ms | restore ms | restore / compute | state KiB |",
             "|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['tokens']} | {r['compute_s'] * 1e3:.1f} | {r['save_s'] * 1e3:.2f} | {r['restore_s'] * 1e3:.2f} | "
              f"{r['restore_s'] / r['compute_s']:.4f} | {r['state_bytes'] / 1024:.0f} |" for r in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
