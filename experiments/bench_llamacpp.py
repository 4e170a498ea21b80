"""llama.cpp backend vs the hf backend on Qwen2.5-Coder-0.5B: decode tokens/s at batch 1 and 8, prefill ms per
prompt token with and without prefix reuse, at 1 and 2 threads, in one run.

    .venv/bin/python experiments/bench_llamacpp.py [--engines hf:1,hf:2,llamacpp:1,llamacpp:2,llamacpp_fast:1]
                                                   [--new-tokens 32]
                                                   [--prefill-rows 4] [--repeats 2] [--hf-dtype auto]

Each engine runs in its own child process, one after another in the order given; within a child, decode timings are
the best (minimum time) of `--repeats`, since other work on a shared machine only ever adds time; prefill calls run
once each (a second run of the same call would find its prefix cached). Per engine:

* decode: B different "write a long story" prompts, `generate` with max_new_tokens=N and with 1; tokens/s =
  (output tokens(N) - B) / (t(N) - t(1)) at B = 1 and 8 (the prompt's prefill cancels out).
* prefill: the planner's real prompts (conf/decomposer/default.yaml: ~500 tokens of instructions and examples, then
  the query; MMLU compound queries from bench_latency's workload), `generate` with max_new_tokens=1, ms per prompt
  token = seconds / all prompt tokens of the call. hf: 1 prompt and `--prefill-rows` prompts (left-padded).
  llama.cpp without prefix reuse: the same; with it: `cold` (fresh model: the shared prefix is computed once for
  the call), `warm` (other queries after that call: the prefix is already cached), for 1 and for `--prefill-rows`.
* `llamacpp`: the backend's defaults (batch-invariant kernels); `llamacpp_fast`: kv_unified, repack and
  tiled_matmul on (llama-server's shared KV cache and ggml's faster, batch-dependent kernels).
* agreement: llama.cpp's decode answers at 1 vs 2 threads and with vs without reuse (expected identical: the
  backend's per-sequence KV layout is batch-invariant), and vs hf (expected to differ: Q4_K_M vs bf16/fp32).

Same prompt ids for every engine (the llama.cpp backend renders the GGUF's template like transformers does).
The load average is recorded before and after every child. Writes experiments/results/bench_llamacpp.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
TOPICS = ["a dragon", "a lighthouse keeper", "a lost robot", "two rival chefs", "a haunted library",
          "a mountain village", "a time traveller", "a shipwreck"]


def story(topic: str, n: int):
    from compllm.backends.base import GenerationRequest

    return GenerationRequest(({"role": "user", "content": f"Write a long story about {topic}."},), n)


def planner_requests(n: int, skip: int = 0):
    sys.path.insert(0, str(ROOT / "experiments"))
    from bench_latency import compose, workload
    from hydra.utils import instantiate

    decomposer = instantiate(compose(["model=qwen2.5-coder-0.5b"]).decomposer)
    return [decomposer.request(text) for text, _ in workload(skip + n)[skip:]], decomposer


def timed(model, requests, **kw):
    start = time.perf_counter()
    out = model.generate(requests, **kw)
    return time.perf_counter() - start, out


def worker(engine: str, threads: int, args) -> dict:
    """One engine in this process: load, decode, prefill; a dict of results."""
    from omegaconf import OmegaConf

    sys.path.insert(0, str(ROOT / "experiments"))
    from bench_latency import compose

    from compllm.backends.pool import ModelPool

    llamacpp = engine.startswith("llamacpp")
    overrides = [f"model=qwen2.5-coder-0.5b{'-llamacpp' if llamacpp else ''}"]
    if llamacpp:
        fast = engine == "llamacpp_fast"
        overrides += [f"models.default.llamacpp.threads={threads}"] + [
            f"models.default.llamacpp.{k}={fast}" for k in ("kv_unified", "repack", "tiled_matmul")]
    else:
        import torch

        torch.set_num_threads(threads)
        overrides += [f"models.default.dtype={args.hf_dtype}"]
    cfg = compose(overrides)
    spec = OmegaConf.to_container(cfg.models, resolve=True, enum_to_str=True)
    pool = ModelPool(spec, cache_dir=cfg.cache_dir)
    model = pool.get("default")
    res = {"engine": engine, "threads": threads, "load_s": model.stats.load_seconds,
           "weight_bytes": model.weight_bytes, "dtype": getattr(model, "dtype", "gguf Q4_K_M")}
    # decode
    for batch in (1, 8):
        reqs_n = [story(t, args.new_tokens) for t in TOPICS[:batch]]
        reqs_1 = [story(t, 1) for t in TOPICS[:batch]]
        timed(model, reqs_1)  # warm-up
        t1, tn, outs = [], [], None
        for _ in range(args.repeats):
            t1.append(timed(model, reqs_1)[0])
            seconds, outs = timed(model, reqs_n)
            tn.append(seconds)
        tokens = sum(g.output_tokens for g in outs)
        res[f"decode_b{batch}"] = {"tok_s": (tokens - batch) / max(min(tn) - min(t1), 1e-9), "tokens": tokens,
                                   "t_new": min(tn), "t_one": min(t1)}
        res[f"answers_b{batch}"] = [g.text for g in outs]
    # prefill
    rows = args.prefill_rows
    planner, _ = planner_requests(2 * rows + 2)
    first = [r.__class__(r.messages, 1) for r in planner[:rows]]
    second = [r.__class__(r.messages, 1) for r in planner[rows:2 * rows]]
    lone = [r.__class__(r.messages, 1) for r in planner[2 * rows:2 * rows + 2]]

    def prefill(m, reqs) -> dict:
        seconds, out = timed(m, reqs)
        tokens = sum(g.prompt_tokens for g in out)
        return {"ms_per_token": 1000 * seconds / tokens, "prompt_tokens": tokens, "seconds": seconds,
                "reused": sum(g.cached_tokens for g in out), "first_tokens": [g.text for g in out]}

    if not llamacpp:
        res["prefill"] = {"b1": prefill(model, lone[:1]), f"b{rows}": prefill(model, first)}
    else:
        from compllm.backends.llamacpp import LlamaCppModel, LlamaCppSettings

        settings = dict(spec["default"]["llamacpp"])
        plain = LlamaCppModel("plain", model.path, LlamaCppSettings(**{**settings, "prefix_cache": False}))
        res["prefill"] = {"no_reuse_b1": prefill(plain, lone[:1]), f"no_reuse_b{rows}": prefill(plain, first)}
        del plain
        fresh = LlamaCppModel("fresh", model.path, LlamaCppSettings(**settings))
        res["prefill"].update({f"reuse_cold_b{rows}": prefill(fresh, first), f"reuse_warm_b{rows}": prefill(fresh, second),
                               "reuse_warm_b1": prefill(fresh, lone[1:2])})
        # agreement of the decode answers with the prefix cache off
        plain = LlamaCppModel("plain", model.path, LlamaCppSettings(**{**settings, "prefix_cache": False}))
        res["answers_b8_no_reuse"] = [g.text for g in plain.generate([story(t, args.new_tokens) for t in TOPICS])]
    return res


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engines", default="hf:1,hf:2,llamacpp:1,llamacpp:2,llamacpp_fast:1")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--prefill-rows", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--hf-dtype", default="auto")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(RESULTS / "bench_llamacpp"))
    args = ap.parse_args()
    if args.worker:
        engine, threads = args.worker.split(":")
        print("RESULT " + json.dumps(worker(engine, int(threads), args)), flush=True)
        return
    engines = args.engines.split(",")
    runs = []
    cmd_line = " ".join([Path(sys.executable).name, "experiments/bench_llamacpp.py", *sys.argv[1:]])
    started = time.time()
    for spec in engines:  # one repeat of the whole protocol per engine: the worker repeats inside
        child = [sys.executable, __file__, "--worker", spec, "--new-tokens", str(args.new_tokens),
                 "--prefill-rows", str(args.prefill_rows), "--repeats", str(args.repeats), "--hf-dtype", args.hf_dtype]
        before, t0 = loadavg(), time.time()
        proc = subprocess.run(child, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not line:
            print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"{spec} failed")
        result = json.loads(line[0][len("RESULT "):])
        result.update(loadavg_before=before, loadavg_after=loadavg(), wall_s=round(time.time() - t0, 1))
        runs.append(result)
        print(f"{spec}: {time.time() - t0:.0f}s, load {before} -> {result['loadavg_after']}", flush=True)
    out = {"command": cmd_line, "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)),
           "machine": machine(), "runs": runs, "agreement": agreement(runs)}
    Path(args.out + ".json").write_text(json.dumps(out, indent=2))
    Path(args.out + ".md").write_text(markdown(out, args))
    print(markdown(out, args))


def machine() -> dict:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    flags = Path("/proc/cpuinfo").read_text()
    versions = {}
    for dist in ("torch", "transformers", "llama-cpp-python"):
        try:
            import importlib.metadata as md

            versions[dist] = md.version(dist)
        except Exception:  # noqa: BLE001
            versions[dist] = None
    return {"cpu": cpu, "cores": os.cpu_count(), "avx512": " avx512f " in flags, "python": platform.python_version(),
            **versions}


def agreement(runs: list[dict]) -> dict:
    by = {(r["engine"], r["threads"]): r for r in runs}
    out = {}
    ll = [r for r in runs if r["engine"] == "llamacpp"]
    unified = [r for r in runs if r["engine"] == "llamacpp_fast"]
    if ll and unified:
        out["fast_vs_default_b8_identical"] = sum(a == b for a, b in zip(unified[0]["answers_b8"],
                                                                                  ll[0]["answers_b8"]))
    if len(ll) >= 2:
        out["llamacpp_threads_same_b8"] = ll[0]["answers_b8"] == ll[1]["answers_b8"]
    for r in ll + unified:
        out[f"{r['engine']}_t{r['threads']}_reuse_vs_no_reuse_same_b8"] = r["answers_b8"] == r["answers_b8_no_reuse"]
        out[f"{r['engine']}_t{r['threads']}_b1_equals_b8_row0"] = r["answers_b1"][0] == r["answers_b8"][0]
        hf = next((h for (e, _), h in by.items() if e == "hf"), None)
        if hf is not None:
            out[f"{r['engine']}_t{r['threads']}_vs_hf_b8_identical"] = sum(
                a == b for a, b in zip(r["answers_b8"], hf["answers_b8"]))
    return out


def markdown(out: dict, args) -> str:
    m = out["machine"]
    lines = [f"# llama.cpp backend vs hf backend: Qwen2.5-Coder-0.5B-Instruct ({out['started']})", "",
             f"`{out['command']}`", "",
             f"CPU: {m['cpu']}, {m['cores']} cores, AVX-512: {m['avx512']}; Python {m['python']}, torch {m['torch']}, "
             f"transformers {m['transformers']}, llama-cpp-python {m['llama-cpp-python']} (built from sdist, native).",
             "Machine shared with other jobs: load average (1/5/15 min) before -> after each engine is in the table; "
             "read ratios within this run, not absolute numbers.", "",
             f"Decode: greedy tokens/s summed over the batch, N={args.new_tokens} new tokens, "
             f"best of {args.repeats}. Prefill: ms per prompt token of the planner's prompts "
             f"(~500 shared tokens + the query), 1 or {args.prefill_rows} per call.", "",
             "| engine | threads | weights | load s | decode b1 tok/s | decode b8 tok/s | prefill b1 ms/tok | "
             f"prefill b{args.prefill_rows} ms/tok | load avg before -> after |", "|---|---|---|---|---|---|---|---|---|"]
    rows = args.prefill_rows
    for r in out["runs"]:
        p = r["prefill"]
        if r["engine"] == "hf":
            b1, bn = f"{p['b1']['ms_per_token']:.1f}", f"{p[f'b{rows}']['ms_per_token']:.1f}"
        else:
            b1 = f"{p['no_reuse_b1']['ms_per_token']:.1f} (reuse warm: {p['reuse_warm_b1']['ms_per_token']:.1f})"
            bn = (f"{p[f'no_reuse_b{rows}']['ms_per_token']:.1f} (reuse cold: "
                  f"{p[f'reuse_cold_b{rows}']['ms_per_token']:.1f}, warm: {p[f'reuse_warm_b{rows}']['ms_per_token']:.1f})")
        lines.append(f"| {r['engine']} | {r['threads']} | {r['dtype']}, {r['weight_bytes'] / 2**20:.0f} MiB | "
                     f"{r['load_s']:.1f} | {r['decode_b1']['tok_s']:.1f} | {r['decode_b8']['tok_s']:.1f} | {b1} | {bn} | "
                     f"{r['loadavg_before']} -> {r['loadavg_after']} |")
    lines += ["", "Reuse (llama.cpp): prompt tokens the call did not compute (KV copied from the cached prefix) / all:",
              ""]
    for r in out["runs"]:
        if r["engine"] != "hf":
            p = r["prefill"]
            lines.append(f"- {r['engine']}, {r['threads']} thread(s): " + ", ".join(
                f"{k}: {v['reused']}/{v['prompt_tokens']}" for k, v in p.items() if k.startswith("reuse")))
    lines += ["", "Agreement of the decode answers: " + ", ".join(f"{k}: {v}" for k, v in out["agreement"].items()), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
