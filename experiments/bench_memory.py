"""Where a run's memory goes: base (imports, router embedder, model code), weights, load transient, KV and prefill
workspace; the compiler's planned peak against the measured one.

    .venv/bin/python experiments/bench_memory.py                         # the `make run` query
    .venv/bin/python experiments/bench_memory.py --queries-file q.txt    # one query per line
    .venv/bin/python experiments/bench_memory.py --latency-workload 20   # bench_latency.py's graph (gold splits)
    ... --override models.default.dtype=float32 auto_calibrate=false     # any Hydra overrides

Runs the default pipeline in this process, stage by stage, reading the resident set size with
`compllm.runtime.memory` (a `PeakWindow` per stage: what it kept, and its peak). The run itself is
`Pipeline.run`, whose result carries `memory.measured_peak_bytes` (the process's peak since it started) and
`memory.planned_peak_bytes` (the compiler's plan). "expected" is the peak the cost model's numbers give with the
tokens the run really used: base + weights + max(load transient, the largest call's KV + prefill workspace); it is
what the plan should reach once its token estimates are right.
Writes <out>.json and <out>.md (default experiments/results/bench_memory).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(ROOT))

from compllm.runtime.memory import PeakWindow, current_rss_bytes, release_free_heap, run_peak_rss_bytes  # noqa: E402

GIB = 2**30
MAKE_RUN_QUERY = ("What legal remedy does a tenant usually have if the landlord keeps the security deposit without "
                  "giving a reason? Also, which vitamin is lacking in someone with scurvy, and how much is 15% of 240?")


def window(stages: dict, name: str):
    """Record a stage's memory: `with window(stages, "x"): ...`."""
    import contextlib

    @contextlib.contextmanager
    def run():
        release_free_heap()
        start = time.perf_counter()
        with PeakWindow() as w:
            yield w
        stages[name] = {"start": w.start, "end": w.end, "peak": w.peak, "kept": w.retained,
                        "peak_above_start": w.peak_above_start, "seconds": round(time.perf_counter() - start, 2)}

    return run()


class RssSampler:
    """RSS every 50 ms on a thread during the run, to say which plan step was running at the peak."""

    def __init__(self, every: float = 0.05):
        import threading

        self.every, self.samples, self._stop = every, [], threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.perf_counter() - self.t0, current_rss_bytes()))
            self._stop.wait(self.every)

    def __enter__(self) -> "RssSampler":
        self.t0 = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def coarse(self, seconds: float = 5.0) -> list[tuple[float, int]]:
        buckets: dict[int, int] = {}
        for t, rss in self.samples:
            buckets[int(t // seconds)] = max(buckets.get(int(t // seconds), 0), rss)
        return [(k * seconds, v) for k, v in sorted(buckets.items())]

    def step_at_peak(self, records, plan: dict) -> dict:
        """The plan step whose span holds the sampled peak (record times count from the execute stage's start,
        so they are matched by the step's position in the run, approximately)."""
        if not self.samples:
            return {}
        t_peak, rss = max(self.samples, key=lambda s: s[1])
        steps = {s["id"]: s for s in plan.get("steps", [])}
        end = max((r.end for r in records), default=0.0)
        offset = max(self.samples[-1][0] - end, 0.0)  # execute is the run's last stage: align the ends
        for r in records:
            if r.start <= t_peak - offset <= r.end:
                step = steps.get(r.step_id, {})
                return {"rss": rss, "t": round(t_peak, 1), "step": r.step_id, "kind": r.kind,
                        "nodes": len(step.get("nodes", ())), "slots": step.get("slots", 0)}
        return {"rss": rss, "t": round(t_peak, 1), "step": None}


def largest_call(result: dict, cost_model) -> dict:
    """The generate step whose KV + workspace is largest, from the tokens the run really used."""
    nodes = {n["node_id"]: n for q in result["queries"] for n in q["nodes"]}
    best = {"bytes": 0}
    for step in (result.get("plan") or {}).get("steps", []):
        ran = [nodes[n] for n in step.get("nodes", ()) if n in nodes and nodes[n]["prompt_tokens"]]
        if not ran:
            continue
        mc = cost_model.cost(step["model"])
        rows = min(step.get("slots") or len(ran), len(ran))
        prompt, output = max(n["prompt_tokens"] for n in ran), max(n["output_tokens"] for n in ran)
        kv = rows * (prompt + output) * mc.kv_bytes_per_token
        workspace = int(rows * prompt * mc.workspace_bytes_per_token)
        if kv + workspace > best["bytes"]:
            best = {"step": step["id"], "rows": rows, "prompt_tokens": prompt, "output_tokens": output, "kv": kv,
                    "workspace": workspace, "bytes": kv + workspace}
    return best


def table(record: dict) -> str:
    s, b = record["stages"], record["breakdown"]
    g = lambda n: f"{n / GIB:.2f}"  # noqa: E731
    rows = [
        ("python + imports (torch, transformers, sentence-transformers, compllm)", s["imports"]["end"],
         "RSS after the imports"),
        ("router embedder (MiniLM), fitted", s["router"]["kept"], "RSS kept by `router.fit`"),
        ("model code (transformers model modules)", s["model_code"]["kept"], "RSS kept by importing the model class"),
        ("**base** (`CostModel.base_bytes`)", b["base"], "measured by `build_cost_model`"),
        ("weights as resident (compute dtype + tokenizer)", b["weights"], b["weights_how"]),
        ("load transient (peak - kept)", b["load_extra"], b["weights_how"]),
        ("KV of the largest call", b["call"].get("kv", 0),
         f"{b['call'].get('rows', 0)} rows x ({b['call'].get('prompt_tokens', 0)} + "
         f"{b['call'].get('output_tokens', 0)}) tokens x KV/token"),
        ("prefill workspace of the largest call", b["call"].get("workspace", 0),
         f"{b['call'].get('rows', 0)} rows x {b['call'].get('prompt_tokens', 0)} tokens x workspace/token"),
        ("calibration: peak above its start", s["calibrate"]["peak_above_start"],
         f"{s['calibrate']['seconds']:.0f} s (0 when already calibrated)"),
        ("run: peak above its start (weights loaded)", s["run"]["peak_above_start"], "`Pipeline.run`"),
        ("run: the step running at the peak", b["at_peak"].get("rss", 0),
         f"{b['at_peak'].get('step')} ({b['at_peak'].get('nodes', 0)} nodes, {b['at_peak'].get('slots', 0)} slots)"),
        ("**expected peak** = base + weights + max(load transient, largest call)", b["expected"],
         "the cost model's numbers, the run's tokens"),
        ("**planned peak** (compiler)", record["memory"].get("planned_peak_bytes") or 0, "`result.memory`"),
        ("**measured peak** (process)", record["memory"]["measured_peak_bytes"], "`result.memory` (VmHWM, kept "
                                                                                  "across resets)"),
    ]
    lines = [f"{record['model']} ({record['dtype']}), {record['queries']} queries, policy {record['policy']}; "
             f"measured / expected {b['measured_over_expected']:.2f}, measured / planned "
             f"{b['measured_over_planned']:.2f}", "", "| component | GiB | how |", "|---|---|---|"]
    lines += [f"| {name} | {g(v)} | {how} |" for name, v, how in rows]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--queries-file")
    ap.add_argument("--latency-workload", type=int, default=0, help="run bench_latency.py's N-query graph instead")
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--override", nargs="*", default=[], help="Hydra overrides, e.g. models.default.dtype=float32")
    ap.add_argument("--out", default=str(RESULTS / "bench_memory"))
    args = ap.parse_args()
    stages: dict = {}
    with window(stages, "imports"):
        import sentence_transformers  # noqa: F401
        import torch  # noqa: F401
        import transformers  # noqa: F401

        from compllm.apps.build import build_pipeline
        from compllm.calibration import build_cost_model, describe
        from compllm.calibration.build import import_model_code
    sys.path.insert(0, str(ROOT / "experiments"))
    from bench_latency import compose

    cfg = compose([f"model={args.model}", *args.override])
    pipeline = build_pipeline(cfg)
    with window(stages, "router"):
        pipeline.router.fit(pipeline.experts)
    with window(stages, "model_code"):
        infos = [describe(pipeline.pool, alias) for alias in pipeline.model_aliases()]
        for info in infos:
            import_model_code(info)
    with window(stages, "calibrate"):
        cost_model = build_cost_model(pipeline.pool, pipeline.expert_models(), cfg.cache_dir, cfg.auto_calibrate,
                                      cfg.show_progress, also=[pipeline.decomposer.model])
    pipeline.cost = cost_model  # the run compiles with this cost model (Pipeline.prepare builds it only once)
    loads = {}
    for alias in pipeline.model_aliases():
        if alias not in pipeline.pool.loaded():
            with window(loads, alias):
                pipeline.pool.get(alias)
    if args.latency_workload:
        from bench_latency import workload

        from compllm.frontend.decomposer import Decomposition

        items = workload(args.latency_workload)
        queries = [text for text, _ in items]
        decompositions = [Decomposition(text, tuple(subs), False) for text, subs in items]
    else:
        text = Path(args.queries_file).read_text(encoding="utf-8") if args.queries_file else MAKE_RUN_QUERY
        queries, decompositions = [q for q in text.splitlines() if q.strip()], None
    sampler = RssSampler()
    with window(stages, "run"), sampler:
        run_result, _ = pipeline.run(queries, decompositions=decompositions)
    result = run_result.to_dict()
    result.pop("trace", None)

    aliases = list(dict.fromkeys(pipeline.expert_models().values()))
    if loads:  # loaded here: what the load really kept and its transient
        weights = sum(w["kept"] for w in loads.values())
        load_extra = max(w["peak"] - w["end"] for w in loads.values())
        weights_how = "`PeakWindow` around the load here"
    else:  # loaded (and measured) by calibration in this process, or estimated where calibration could not
        weights = sum(cost_model.cost(a).weight_bytes for a in aliases)
        load_extra = max(cost_model.cost(a).load_extra_bytes for a in aliases)
        weights_how = "the cost model (calibration's load window)"
    call = largest_call(result, cost_model)
    at_peak = sampler.step_at_peak(getattr(pipeline.policy, "step_records", ()), result.get("plan") or {})
    expected = cost_model.base_bytes + weights + max(load_extra, call.get("bytes", 0))
    measured = result["memory"]["measured_peak_bytes"]
    planned = result["memory"].get("planned_peak_bytes") or 0
    record = {
        "model": cfg.models.default.name, "dtype": infos[0].dtype, "policy": run_result.policy,
        "queries": len(queries), "overrides": args.override,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "stages": stages, "loads": loads, "memory": result["memory"], "timings": result["timings"],
        "cost_model": cost_model.to_dict(),
        "breakdown": {"base": cost_model.base_bytes, "weights": weights, "load_extra": load_extra,
                      "weights_how": weights_how, "call": call, "expected": expected,
                      "measured_over_expected": measured / expected,
                      "measured_over_planned": measured / planned if planned else float("nan"),
                      "rss_end": current_rss_bytes(), "run_peak": run_peak_rss_bytes(), "at_peak": at_peak},
        "rss_timeline": sampler.coarse(),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(record, indent=1, default=str), encoding="utf-8")
    md = table(record)
    out.with_suffix(".md").write_text(md + "\n", encoding="utf-8")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
