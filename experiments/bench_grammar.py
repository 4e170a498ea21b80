"""What enforcing the plan schema costs per token on the hf backend (xgrammar, `compllm/backends/grammar.py`).

    OMP_NUM_THREADS=1 .venv/bin/python experiments/bench_grammar.py [--model qwen2.5-coder-0.5b] [--tokens 64] [--repeats 3]

The same planner requests (`decomposer=fanoutqa`, its exemplars in the prompt) are decoded with and without their
json_schema, interleaved, `--repeats` times; per variant the median over repeats of the seconds per output token
outside prefill (wall - prefill), and for the constrained rows the time spent choosing tokens under the grammar
(`RowGrammar.pick`: the accept check, plus the vocabulary mask on the steps where the greedy token breaks the
grammar) and how often the mask was needed. The schema's one-off compile is timed separately (it is cached per
tokenizer and schema). Writes experiments/results/bench_grammar.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(ROOT / "experiments"))

from bench_latency import compose  # noqa: E402

QUERIES = ["Who wrote Romeo and Juliet, and in which country was that author born?",
           "Which planet is largest, how many moons does it have, and who discovered the first of them?"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import xgrammar

    from compllm.backends import grammar
    from compllm.backends.pool import ModelPool
    from hydra.utils import instantiate

    cfg = compose([f"model={args.model}", "models.default.dtype=float32", "decomposer=fanoutqa"])
    model = ModelPool(cfg.models).get("default")
    decomposer = instantiate(cfg.decomposer, _convert_="all")
    schema = decomposer.json_schema
    start = time.perf_counter()
    model._grammars.compiled(xgrammar, schema)
    compile_s = time.perf_counter() - start

    picks = {"seconds": 0.0, "calls": 0, "masked": 0}
    pick = grammar.RowGrammar.pick

    def timed_pick(self, best, logits):
        t, before = time.perf_counter(), self.masked_steps
        try:
            return pick(self, best, logits)
        finally:
            picks["seconds"] += time.perf_counter() - t
            picks["calls"] += 1
            picks["masked"] += self.masked_steps - before

    grammar.RowGrammar.pick = timed_pick
    requests = [replace(decomposer.request(q), max_new_tokens=args.tokens) for q in QUERIES]
    variants = {"free": [replace(r, json_schema="") for r in requests], "schema": requests}
    samples = {k: [] for k in variants}
    for rep in range(args.repeats):
        for name in (("free", "schema") if rep % 2 == 0 else ("schema", "free")):  # order alternates: drift hits both
            batch = variants[name]
            for r in batch:  # one row at a time: the per-token cost of one planner row
                prefill0, picks0 = model.stats.prefill_seconds, dict(picks)
                t = time.perf_counter()
                g = model.generate([r])[0]
                wall = time.perf_counter() - t
                prefill = model.stats.prefill_seconds - prefill0
                assert g.constrained == (name == "schema")
                samples[name].append({"wall_s": wall, "prefill_s": prefill, "tokens": g.output_tokens,
                                      "s_per_token": (wall - prefill) / g.output_tokens,
                                      "pick_s": picks["seconds"] - picks0["seconds"],
                                      "picks": picks["calls"] - picks0["calls"],
                                      "masked": picks["masked"] - picks0["masked"]})
    grammar.RowGrammar.pick = pick
    # the step the models above rarely take: the greedy token ("x" where the plan must start with "[") breaks the
    # grammar, so the whole vocabulary is masked
    import torch

    stray, logits, masked_s = model.tokenizer.encode("x", add_special_tokens=False)[0], torch.randn(
        model._grammars.vocab_size), []
    for _ in range(20):
        row = model._grammars.row(schema)
        t = time.perf_counter()
        row.pick(stray, logits)
        masked_s.append(time.perf_counter() - t)
    masked_ms = 1000 * statistics.median(masked_s)
    med = {k: statistics.median(s["s_per_token"] for s in v) for k, v in samples.items()}
    pick_ms = 1000 * sum(s["pick_s"] for s in samples["schema"]) / max(1, sum(s["picks"] for s in samples["schema"]))
    n_masked = sum(s["masked"] for s in samples["schema"])
    n_picks = sum(s["picks"] for s in samples["schema"])
    result = {"model": model.name, "threads": os.environ.get("OMP_NUM_THREADS", "default"), "tokens": args.tokens,
              "repeats": args.repeats, "compile_s": compile_s, "ms_per_token": {k: 1000 * v for k, v in med.items()},
              "overhead_ratio": med["schema"] / med["free"], "pick_ms_per_token": pick_ms,
              "masked_pick_ms": masked_ms, "masked_steps": n_masked, "constrained_steps": n_picks, "samples": samples}
    lines = [f"{model.name}, fp32, CPU (OMP_NUM_THREADS={result['threads']}), planner prompt (`decomposer=fanoutqa`), "
             f"{len(QUERIES)} queries x {args.repeats} repeats, up to {args.tokens} tokens each, one row at a time", "",
             "| decoding | ms per output token (median, excl. prefill) | tokens per answer |", "|---|---|---|"]
    for k, v in samples.items():
        lines.append(f"| {k} | {1000 * med[k]:.1f} | {sorted({s['tokens'] for s in v})} |")
    lines += ["", f"Constrained / free per-token time: {result['overhead_ratio']:.3f}x. Choosing each token under the "
              f"grammar (`RowGrammar.pick`) took {pick_ms:.2f} ms on average; the greedy token broke the grammar (so "
              f"the vocabulary was masked) on {n_masked} of {n_picks} steps; a masked step (vocabulary of "
              f"{model._grammars.vocab_size}) takes {masked_ms:.2f} ms (median of 20). One-off schema compile "
              f"(cached per tokenizer and schema): {compile_s:.1f} s."]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "bench_grammar.json").write_text(json.dumps(result, indent=1))
    (RESULTS / "bench_grammar.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
