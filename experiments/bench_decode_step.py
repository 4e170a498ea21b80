"""Decode-step time by batch size for each CPU decode kernel (`decode_matmul`), one process, same weights.

    .venv/bin/python experiments/bench_decode_step.py [--model qwen2.5-coder-0.5b] [--repeats 3]

Why: batching only pays if a decode step over b rows costs much less than b steps over one row. On a 2-core
AVX2 CPU in fp32, `F.linear` with 2-8 rows is slow; `decode_matmul: auto` multiplies `weight @ x.T` instead.
For each kernel and batch size: prefill b random 200-token prompts, then time 6 decode steps; the median step
per repeat, then the median over repeats (kernels interleaved, so drift hits both alike).
Writes experiments/results/bench_decode_step.{json,md}.
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
RESULTS = ROOT / "experiments" / "results"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(ROOT / "experiments"))

from bench_latency import compose  # noqa: E402


def step_seconds(hf_model, batch: int, prompt_tokens: int = 200, steps: int = 6) -> float:
    """Median seconds of one decode step at `batch` rows after a `prompt_tokens` prefill."""
    import torch
    from transformers import DynamicCache

    ids = torch.randint(100, 1000, (batch, prompt_tokens))
    cache = DynamicCache()
    times = []
    with torch.inference_mode():
        hf_model._forward(ids, torch.ones_like(ids), None, cache)
        token = torch.randint(100, 1000, (batch, 1))
        for _ in range(steps):
            start = time.perf_counter()
            hf_model._forward(token, None, None, cache)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    from compllm.backends.pool import ModelPool

    kernels = ("torch", "auto")
    models = {k: ModelPool(compose([f"model={args.model}", "models.default.dtype=float32",
                                    f"models.default.decode_matmul={k}"]).models).get("default") for k in kernels}
    samples: dict[str, dict[int, list[float]]] = {k: {b: [] for b in args.batches} for k in kernels}
    for _ in range(args.repeats):
        for b in args.batches:
            for k in kernels:
                samples[k][b].append(step_seconds(models[k], b))
    ms = {k: {b: 1000 * statistics.median(v) for b, v in by_b.items()} for k, by_b in samples.items()}
    name = models["auto"].name
    lines = [f"{name}, fp32, CPU ({os.cpu_count()} cores): decode step after a 200-token prefill, "
             f"median of {args.repeats} repeats", "",
             "| batch | F.linear ms/step | weight @ x.T ms/step | throughput vs batch 1 (F.linear) | "
             "throughput vs batch 1 (weight @ x.T) |", "|---|---|---|---|---|"]
    for b in args.batches:
        t, a = ms["torch"][b], ms["auto"][b]
        lines.append(f"| {b} | {t:.0f} | {a:.0f} | {b * ms['torch'][args.batches[0]] / t:.2f}x | "
                     f"{b * ms['auto'][args.batches[0]] / a:.2f}x |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "bench_decode_step.json").write_text(json.dumps(
        {"model": name, "repeats": args.repeats, "ms_per_step": ms, "samples_s": samples}, indent=1))
    (RESULTS / "bench_decode_step.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
