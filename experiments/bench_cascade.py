"""The cascade (0.5B first, 1.5B when the 0.5B is unsure) against each model alone, on meqa_p's gold parts.

    PYTHONPATH=$PWD .venv/bin/python experiments/bench_cascade.py [--calib 100] [--n 200]

What runs: meqa_p (conf/benchmark/meqa_p.yaml: MMLU questions, 2-4 per item from distinct domains) flattened into
its parts, in item order. Each part is one `choice` sub-query sent to its **gold** domain expert (no planner, no
router: this isolates the cascade; the planner/router stages are measured by the report's other systems). Every
system runs through compllm itself: graph -> compiler (passes, `cascade` pass included) -> plan -> executor, on
the in-process llama.cpp backend (Qwen2.5-Coder 0.5B and 1.5B, Q4_K_M GGUFs, 1 thread).

- `small` / `big`: every part on the 0.5B / the 1.5B (a one-model team under the same expert prompts).
- `cascade@t` (**run**): policy=cascade at threshold t, the compiler plans drafts on the 0.5B and guarded escalate
  nodes on the 1.5B; the executor runs an escalation only when the draft's first-token option-letter probability
  margin is below t.
- `cascade@t` (**derived**, the threshold sweep): the draft's answer when its margin >= t, else the big model's
  answer to the same prompt. Exact for these deterministic, batch-invariant engines: the run at the recommended
  threshold checks it (its answers vs the derived ones, reported as `run_matches_derived`).

The threshold is chosen on the first `--calib` parts (calibration split: the cheapest threshold whose accuracy is
within 2 points of `big` there, else the most accurate one at >= 1.67x less compute) and evaluated on the next
`--n` parts, so the reported numbers are not fitted to the parts they are measured on.

Parameter-compute per answered part = sum over the model calls made for it of (model parameters x tokens
processed: prompt tokens, prefix-cache hits included, + output tokens). Accuracy: share of parts answered with
the gold letter, 95% bootstrap CI (10,000 resamples); paired comparison with `big`: exact McNemar test on the
discordant parts and a paired bootstrap CI of the difference. Wall: measured wall seconds of each run's plan
execution (derived thresholds: small wall + big wall x escalated share, marked as estimated).

Writes experiments/results/bench_cascade.json (+ .md table, + bench_cascade.png accuracy vs parameter-compute).
Per-part records are cached in experiments/results/bench_cascade_parts.json so a rerun resumes.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "experiments" / "results"
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SMALL_CFG, BIG_CFG = "qwen2.5-coder-0.5b-llamacpp", "qwen2.5-coder-1.5b-llamacpp"
THRESHOLDS = (0.0, 0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.09, 0.1, 0.12, 0.15, 0.2, 0.3, 0.5, 1.01)
TARGET_POINTS, TARGET_RATIO = 2.0, 1.67


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from compllm.config.schema import register

    register()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose("config", overrides=overrides)


def parts(total: int) -> list[dict[str, Any]]:
    """meqa_p's parts in item order (the benchmark's own construction, fixed seed)."""
    from compllm.bench.meqa import meqa_p

    out = []
    for item in meqa_p(n=300):
        for k, part in enumerate(item.parts):
            out.append({"id": f"{item.id}.{k + 1}", "domain": part["domain"], "question": part["question"],
                        "gold": part["answer"]})
            if len(out) == total:
                return out
    raise ValueError(f"meqa_p(300) has fewer than {total} parts")


def graph_of(ps: list[dict[str, Any]]):
    """One query per part: its question as a `choice` sub-query on its gold domain's expert, joined on the host."""
    from compiler.build import FinalAnswer, RoutedSubQuery, add_query
    from compiler.ir import AGGREGATOR, Graph

    g = Graph()
    for p in ps:
        add_query(g, p["id"], p["question"], [RoutedSubQuery(1, p["question"], (), p["domain"], "choice",
                                                             routed_by="gold")], AGGREGATOR, final=FinalAnswer.join)
    return g


def run_system(pipe, ps: list[dict[str, Any]], model: str | None, cascade=None) -> dict[str, Any]:
    """Compile and execute the parts' graph: every expert on `model` (None: as configured), or with a cascade."""
    from compiler.config import CascadeConfig  # noqa: F401  (type of `cascade`)

    experts = {n: replace(e, model=model) if model else e for n, e in pipe.experts.items()}
    pipe.experts, pipe.cost = experts, None  # the cost model follows the team
    pipe.compiler_config = replace(pipe.compiler_config, cascade=cascade)
    pipe.prepare()
    g = graph_of(ps)
    plan = pipe.compile(g)
    ctx = pipe.context()
    start = time.perf_counter()
    results = pipe.policy.run(plan, ctx, g)
    wall = time.perf_counter() - start
    by_part = {}
    for p in ps:
        nid = f"{p['id']}:1"
        res = results[nid]
        draft = results.get(nid + "~draft")
        calls = [r for r in (draft, res) if r is not None and r.prompt_tokens]  # a model call was made for it
        by_part[p["id"]] = {
            "answer": res.answer.strip()[:1], "ok": res.ok, "model": res.model,
            "confidence": (draft or res).confidence, "escalated": res.escalated,
            "draft_answer": draft.answer.strip()[:1] if draft is not None else None,
            "calls": [{"model": r.model, "prompt_tokens": r.prompt_tokens, "output_tokens": r.output_tokens}
                      for r in calls],
        }
    steps = {s.kind.value: 0 for s in plan.steps}
    for s in plan.steps:
        steps[s.kind.value] += 1
    return {"wall_s": round(wall, 2), "parts": by_part, "plan_steps": steps,
            "planned_peak_bytes": plan.peak_planned_bytes, "footprints": dict(plan.footprints),
            "est_span_s": round(plan.estimated_span_s(), 2)}


# --- statistics -----------------------------------------------------------------------------------
def bootstrap_ci(values: list[float], reps: int = 10000, seed: int = 0) -> tuple[float, float]:
    import numpy as np

    rng = np.random.default_rng(seed)
    v = np.asarray(values, dtype=float)
    means = np.sort(v[rng.integers(0, len(v), size=(reps, len(v)))].mean(axis=1))
    return float(means[int(0.025 * reps)]), float(means[int(0.975 * reps) - 1])


def mcnemar_exact(a: list[int], b: list[int]) -> dict[str, Any]:
    """Two-sided exact McNemar test: the discordant parts, binomial(n, 1/2)."""
    only_a = sum(1 for x, y in zip(a, b) if x and not y)
    only_b = sum(1 for x, y in zip(a, b) if y and not x)
    n = only_a + only_b
    k = min(only_a, only_b)
    p = min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n) if n else 1.0
    return {"only_cascade_right": only_a, "only_big_right": only_b, "p_value": round(p, 4)}


def paired_diff_ci(a: list[int], b: list[int], reps: int = 10000, seed: int = 1) -> tuple[float, float]:
    return bootstrap_ci([x - y for x, y in zip(a, b)], reps, seed)


# --- systems from the records ---------------------------------------------------------------------
def compute_of(record: dict[str, Any], params: dict[str, int]) -> float:
    from compllm.bench.compute import param_compute

    return param_compute(record["calls"], params)


def derived(small: dict, big: dict, t: float) -> dict[str, dict[str, Any]]:
    """cascade@t from the small run (the drafts) and the big run (the escalations' answers and calls)."""
    out = {}
    for pid, s in small.items():
        escalate = s["confidence"] is None or s["confidence"] < t or not s["ok"]
        b = big[pid]
        out[pid] = {"answer": b["answer"] if escalate else s["answer"], "escalated": escalate,
                    "calls": s["calls"] + (b["calls"] if escalate else [])}
    return out


def score(records: dict, ps: list[dict[str, Any]], params: dict[str, int], ci: bool = True) -> dict[str, Any]:
    right = [int(records[p["id"]]["answer"] == p["gold"]) for p in ps]
    compute = [compute_of(records[p["id"]], params) for p in ps]
    lo, hi = bootstrap_ci(right) if ci else (math.nan, math.nan)
    esc = [r.get("escalated") for r in records.values() if r.get("escalated") is not None]
    return {"accuracy": round(sum(right) / len(right), 4), "ci95": [round(lo, 4), round(hi, 4)],
            "param_compute_per_part": statistics.mean(compute), "right": right,
            "escalation_rate": round(sum(esc) / len(esc), 4) if esc else None}


def choose_threshold(small: dict, big: dict, ps: list[dict[str, Any]], params: dict[str, int]) -> float:
    """The cheapest threshold within TARGET_POINTS of `big` on `ps`; else the most accurate one at >= TARGET_RATIO
    less compute; else the most accurate one."""
    big_s = score(big, ps, params, ci=False)
    rows = []
    for t in THRESHOLDS:
        s = score(derived(small, big, t), ps, params, ci=False)
        rows.append((t, s["accuracy"], big_s["param_compute_per_part"] / s["param_compute_per_part"]))
    close = [r for r in rows if (big_s["accuracy"] - r[1]) * 100 <= TARGET_POINTS]
    cheap = [r for r in rows if r[2] >= TARGET_RATIO]
    if close:
        return max(close, key=lambda r: (r[2], -r[0]))[0]
    if cheap:
        return max(cheap, key=lambda r: (r[1], r[2]))[0]
    return max(rows, key=lambda r: (r[1], r[2]))[0]


def mixed_team_big_experts() -> set[str]:
    """The experts `experts=mixed` puts on the big model (conf/experts/mixed.yaml)."""
    cfg = compose([f"model={SMALL_CFG}", "experts=mixed"])
    return {name for name, e in cfg.experts.items() if e.model == "big"}


def split_records(run: dict) -> tuple[dict, dict]:
    """A cascade run at threshold > 1 (every part escalated): its drafts are the 0.5B's answers to every part,
    its escalations the 1.5B's answers to the same prompts."""
    small, big = {}, {}
    for pid, r in run["parts"].items():
        small[pid] = {"answer": r["draft_answer"], "ok": True, "model": "default", "confidence": r["confidence"],
                      "calls": [c for c in r["calls"] if c["model"] == "default"]}
        big[pid] = {"answer": r["answer"], "ok": r["ok"], "model": "big", "confidence": None,
                    "calls": [c for c in r["calls"] if c["model"] == "big"]}
    return small, big


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=200, help="meqa_p parts (the first n, in item order)")
    ap.add_argument("--chunk", type=int, default=20, help="parts per compiled run (results cached per chunk)")
    ap.add_argument("--phase", choices=("all", "check", "report"), default="all",
                    help="all: every part through a cascade that escalates all (both models' answers); check: a "
                         "real cascade run at the recommended threshold on --check-n parts; report: tables")
    ap.add_argument("--check-n", type=int, default=20)
    ap.add_argument("--start", type=int, default=0, help="phase all: begin at this chunk (a second process can take "
                                                         "the later chunks; give it its own --out)")
    ap.add_argument("--streams", type=int, default=2, help="compiler.streams: the two models run side by side")
    ap.add_argument("--out", default=str(RESULTS / "bench_cascade.json"))
    ap.add_argument("--runs", default="bench_cascade*_parts.json", help="check/report: the run caches to read")
    args = ap.parse_args()

    from compiler.config import CascadeConfig

    params_by_name = json.loads((RESULTS / "model_parameters.json").read_text())
    params = {"default": params_by_name["Qwen2.5-Coder-0.5B-Instruct"],
              "big": params_by_name["Qwen2.5-Coder-1.5B-Instruct"]}
    all_parts = parts(args.n)
    cache_path = Path(args.out).with_name(Path(args.out).stem + "_parts.json")
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    pipe = None

    def pipeline():
        nonlocal pipe
        if pipe is None:
            from compllm.apps.build import build_pipeline

            pipe = build_pipeline(compose([f"model={SMALL_CFG}", f"+model@models.big={BIG_CFG}", "auto_calibrate=false",
                                           "show_progress=false", f"compiler.streams={args.streams}",
                                           "compiler.max_call_size=4"]))
        return pipe

    def cached(name: str, ps, cascade) -> dict:
        key = f"{name}|{ps[0]['id']}|{ps[-1]['id']}|{len(ps)}"
        if key not in cache:
            print(f"running {name} on {len(ps)} parts ({ps[0]['id']} .. {ps[-1]['id']}) ...", flush=True)
            cache[key] = run_system(pipeline(), ps, "default", cascade)
            cache_path.write_text(json.dumps(cache))
            print(f"  {cache[key]['wall_s']} s", flush=True)
        return cache[key]

    chunks = [all_parts[i:i + args.chunk] for i in range(0, len(all_parts), args.chunk)]
    always = CascadeConfig("big", 1.01, 1.0, [])  # > any margin: every part escalates (both models answer all)
    if args.phase == "all":
        for ps in chunks[args.start:]:
            cached("escalate_all", ps, always)
        return
    # every escalate-all run of any process (its own --out's cache, siblings' caches), whatever their chunking
    runs, checks = [], {}
    for path in sorted(cache_path.parent.glob(args.runs)):
        other = json.loads(path.read_text())
        runs += [r for k, r in other.items() if k.startswith("escalate_all|")]
        checks.update({k: r for k, r in other.items() if k.startswith("cascade@")})
    small, big = {}, {}
    for r in runs:
        s, b = split_records(r)
        small.update(s)
        big.update(b)
    evals = [p for p in all_parts if p["id"] in small]
    threshold = choose_threshold(small, big, evals, params)
    if args.phase == "check":
        check = evals[:args.check_n]
        cached(f"cascade@{threshold}", check, CascadeConfig("big", threshold, None, []))
        return
    report(args, evals, small, big, runs, threshold, params, checks)


def report(args, evals, small, big, runs, threshold, params, checks) -> None:
    command = ("PYTHONPATH=$PWD .venv/bin/python experiments/bench_cascade.py --phase all --n {n}; ... --phase check; "
               "... --phase report").format(n=args.n)
    s_small, s_big = score(small, evals, params), score(big, evals, params)
    # cross-fitted: each half of the parts scored at the threshold chosen on the other half
    halves = [evals[0::2], evals[1::2]]
    picks = [choose_threshold(small, big, halves[1 - i], params) for i in range(2)]
    cf_records = {}
    for half, t in zip(halves, picks):
        d = derived(small, big, t)
        cf_records.update({p["id"]: d[p["id"]] for p in half})
    s_cf = score(cf_records, evals, params)
    s_at = score(derived(small, big, threshold), evals, params)
    # the mixed team (experts=mixed): each part answered by the model its gold expert runs on, the same prompt as
    # the draft's or the escalation's (exact, as the sweep is)
    on_big = mixed_team_big_experts()
    s_mixed = score({p["id"]: (big if p["domain"] in on_big else small)[p["id"]] for p in evals}, evals, params)
    sweep = []
    for t in sorted(set(THRESHOLDS) | {threshold}):
        s = score(derived(small, big, t), evals, params)
        lo, hi = paired_diff_ci(s["right"], s_big["right"])
        sweep.append({"threshold": t, "accuracy": s["accuracy"], "ci95": s["ci95"],
                      "escalation_rate": s["escalation_rate"],
                      "param_compute_per_part": round(s["param_compute_per_part"] / 1e9, 2),
                      "compute_ratio": round(s_big["param_compute_per_part"] / s["param_compute_per_part"], 3),
                      "vs_big_points": round((s["accuracy"] - s_big["accuracy"]) * 100, 1),
                      "vs_big_diff_ci95_points": [round(lo * 100, 1), round(hi * 100, 1)],
                      "mcnemar_vs_big": mcnemar_exact(s["right"], s_big["right"])})

    def system(name: str, s: dict, how: str) -> dict:
        lo, hi = paired_diff_ci(s["right"], s_big["right"])
        return {"system": name, "how": how, "accuracy": s["accuracy"], "ci95": s["ci95"],
                "param_compute_per_part": round(s["param_compute_per_part"] / 1e9, 2),
                "compute_ratio_vs_big": round(s_big["param_compute_per_part"] / s["param_compute_per_part"], 3),
                "vs_big_points": round((s["accuracy"] - s_big["accuracy"]) * 100, 1),
                "vs_big_diff_ci95_points": [round(lo * 100, 1), round(hi * 100, 1)],
                "mcnemar_vs_big": mcnemar_exact(s["right"], s_big["right"]), "escalation_rate": s["escalation_rate"]}

    check = []  # real cascade runs (any threshold): does the derivation reproduce them?
    for key, run in checks.items():
        t = float(key.split("|")[0].split("@")[1])
        pids = [p for p in run["parts"] if p in small]
        d = derived(small, big, t)
        check.append({"threshold": t, "parts": len(pids), "wall_s": run["wall_s"], "plan_steps": run["plan_steps"],
                      "answers_equal_derived": sum(1 for p in pids if run["parts"][p]["answer"] == d[p]["answer"]),
                      "escalations_equal_derived": sum(1 for p in pids
                                                       if run["parts"][p]["escalated"] == d[p]["escalated"]),
                      "drafts_equal": sum(1 for p in pids if run["parts"][p]["draft_answer"] == small[p]["answer"]),
                      "escalated": sum(1 for p in pids if run["parts"][p]["escalated"])})
    wall = sum(r["wall_s"] for r in runs)
    # what limits the cascade: does the draft's margin separate its right answers from its wrong ones?
    conf = [(small[p["id"]]["confidence"], small[p["id"]]["answer"] == p["gold"]) for p in evals]
    pos, neg = [c for c, ok in conf if ok], [c for c, ok in conf if not ok]
    auroc = (sum((a > b) + 0.5 * (a == b) for a in pos for b in neg) / (len(pos) * len(neg))) if pos and neg else None
    ordered = sorted(conf)
    half = len(ordered) // 2
    def useful(p) -> bool:  # escalating helps exactly here: the draft is wrong and the 1.5B is right
        return small[p["id"]]["answer"] != p["gold"] and big[p["id"]]["answer"] == p["gold"]

    oracle = {p["id"]: {"answer": big[p["id"]]["answer"] if useful(p) else small[p["id"]]["answer"],
                        "escalated": useful(p),
                        "calls": small[p["id"]]["calls"] + (big[p["id"]]["calls"] if useful(p) else [])}
              for p in evals}
    s_oracle = score(oracle, evals, params, ci=False)
    # a perfect score that escalates just enough useful parts to equal the 1.5B's accuracy (the fewest escalations)
    need = max(0, sum(s_big["right"]) - sum(s_small["right"]))
    chosen = [p["id"] for p in evals if useful(p)][:need]
    just = {p["id"]: {**oracle[p["id"]], "escalated": p["id"] in chosen,
                      "answer": big[p["id"]]["answer"] if p["id"] in chosen else small[p["id"]]["answer"],
                      "calls": small[p["id"]]["calls"] + (big[p["id"]]["calls"] if p["id"] in chosen else [])}
            for p in evals}
    s_just = score(just, evals, params, ci=False)
    limits = {"draft_margin_auroc": None if auroc is None else round(auroc, 3),
              "draft_accuracy_low_margin_half": round(sum(ok for _, ok in ordered[:half]) / max(half, 1), 3),
              "draft_accuracy_high_margin_half": round(sum(ok for _, ok in ordered[half:]) / max(len(ordered) - half, 1), 3),
              "draft_margin_median": round(statistics.median(c for c, _ in conf), 4),
              "oracle_escalation": {"accuracy": s_oracle["accuracy"], "escalation_rate": s_oracle["escalation_rate"],
                                    "compute_ratio": round(s_big["param_compute_per_part"]
                                                           / s_oracle["param_compute_per_part"], 3),
                                    "what": "escalate exactly the parts where the draft is wrong and the 1.5B right "
                                            "(a perfect confidence score: the least compute at the 1.5B's accuracy "
                                            "or better)"},
              "perfect_score_matching_big": {"accuracy": s_just["accuracy"], "escalation_rate": s_just["escalation_rate"],
                                             "compute_ratio": round(s_big["param_compute_per_part"]
                                                                    / s_just["param_compute_per_part"], 3)}}
    out = {
        "command": command,
        "setup": {"parts": "meqa_p gold parts (MMLU choice questions, each on its gold domain expert; no planner, "
                           "no router)", "n_parts": len(evals), "engine": "llama.cpp in process, 1 thread each, Q4_K_M",
                  "models": {"default": SMALL_CFG, "big": BIG_CFG}, "parameters": params,
                  "confidence": "choice: first-token probability margin among the option letters (0.5B draft)",
                  "compute": "parameters x (prompt + output tokens) summed over the calls made for a part",
                  "runs": "every part through policy=cascade at threshold 1.01 (every draft escalates), in chunks of "
                          f"{args.chunk} parts, compiler.streams={args.streams}: the drafts are the 0.5B's answers, "
                          "the escalations the 1.5B's; other thresholds derived from them (exact, see check)",
                  "wall_s_all_chunks": round(wall, 1), "machine": platform.machine(), "cpus": os.cpu_count(),
                  "note": "2-core machine shared with other jobs: wall times are loaded-machine times"},
        "threshold": threshold, "threshold_chosen_on": "all evaluation parts (recommended value); the cross-fitted "
                                                       "row scores each half at the threshold chosen on the other half",
        "cross_fit_thresholds": picks,
        "systems": [system("0.5B alone (every part)", s_small, "drafts of the run"),
                    system("1.5B alone (every part)", s_big, "escalations of the run"),
                    system(f"cascade, threshold {threshold} (chosen on these parts)", s_at, "derived"),
                    system(f"cascade, cross-fitted thresholds {picks}", s_cf, "derived, cross-fitted"),
                    system(f"mixed team (experts=mixed: {', '.join(sorted(on_big))} on the 1.5B)", s_mixed,
                           "derived: each part from its expert's model")],
        "sweep": sweep,
        "check_real_cascade_run": check,
        "limits": limits,
        "summary": {"n_parts": len(evals), "threshold": threshold,
                    "cascade_vs_mono15_points": round((s_at["accuracy"] - s_big["accuracy"]) * 100, 1),
                    "cascade_compute_ratio": round(s_big["param_compute_per_part"] / s_at["param_compute_per_part"], 3),
                    "cascade_escalation_rate": s_at["escalation_rate"],
                    "cascade_vs_mono15_points_cross_fitted": round((s_cf["accuracy"] - s_big["accuracy"]) * 100, 1),
                    "cascade_compute_ratio_cross_fitted": round(
                        s_big["param_compute_per_part"] / s_cf["param_compute_per_part"], 3),
                    "mono05_vs_mono15_points": round((s_small["accuracy"] - s_big["accuracy"]) * 100, 1),
                    # the most accurate threshold that does spend >= 1.67x less than the 1.5B (the other end)
                    "at_target_compute": max(([{k: r[k] for k in ("threshold", "vs_big_points", "compute_ratio",
                                                                  "escalation_rate", "vs_big_diff_ci95_points")}
                                               for r in sweep if r["compute_ratio"] >= TARGET_RATIO]),
                                             key=lambda r: (r["vs_big_points"], r["compute_ratio"]), default=None),
                    "target_met": (s_big["accuracy"] - s_at["accuracy"]) * 100 <= TARGET_POINTS
                    and s_big["param_compute_per_part"] / s_at["param_compute_per_part"] >= TARGET_RATIO},
    }
    Path(args.out).write_text(json.dumps(out, indent=1))
    write_md(out, Path(args.out).with_suffix(".md"))
    plot(out, Path(args.out).with_suffix(".png"))
    print(json.dumps(out["summary"], indent=1))


def write_md(out: dict, path: Path) -> None:
    st = out["setup"]
    lines = [f"# Cascade 0.5B -> 1.5B on meqa_p gold parts (n = {st['n_parts']} parts)", "",
             f"Command: `{out['command']}`", "",
             f"{st['parts']}; engine {st['engine']}. Confidence: {st['confidence']}. Compute: {st['compute']} "
             f"(units of 1e9). Runs: {st['runs']}. {st['note']}; total wall of the runs {st['wall_s_all_chunks']} s.",
             "", f"Recommended threshold {out['threshold']} ({out['threshold_chosen_on']}; cross-fitted thresholds "
             f"{out['cross_fit_thresholds']}).", "",
             "| system | how | accuracy [95% CI] | vs 1.5B, points [paired 95% CI] | McNemar p (cascade-only right / "
             "1.5B-only right) | escalated | param-compute / part | 1.5B / this |", "|---|---|---|---|---|---|---|---|"]
    for s in out["systems"]:
        m = s["mcnemar_vs_big"]
        lines.append(f"| {s['system']} | {s['how']} | {s['accuracy']:.3f} [{s['ci95'][0]:.3f}, {s['ci95'][1]:.3f}] | "
                     f"{s['vs_big_points']:+.1f} [{s['vs_big_diff_ci95_points'][0]:+.1f}, "
                     f"{s['vs_big_diff_ci95_points'][1]:+.1f}] | {m['p_value']} ({m['only_cascade_right']}/"
                     f"{m['only_big_right']}) | {'' if s['escalation_rate'] is None else s['escalation_rate']} | "
                     f"{s['param_compute_per_part']} | {s['compute_ratio_vs_big']} |")
    lines += ["", "Threshold sweep (derived: the draft's letter if its margin >= t, else the 1.5B's answer to the same "
              "prompt):", "",
              "| threshold | accuracy [95% CI] | escalated | vs 1.5B, points [paired CI] | McNemar p | "
              "param-compute / part | 1.5B / this |", "|---|---|---|---|---|---|---|"]
    for r in out["sweep"]:
        lines.append(f"| {r['threshold']} | {r['accuracy']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}] | "
                     f"{r['escalation_rate']} | {r['vs_big_points']:+.1f} [{r['vs_big_diff_ci95_points'][0]:+.1f}, "
                     f"{r['vs_big_diff_ci95_points'][1]:+.1f}] | {r['mcnemar_vs_big']['p_value']} | "
                     f"{r['param_compute_per_part']} | {r['compute_ratio']} |")
    lines += ["", f"What limits the cascade (the draft's margin as a predictor of its correctness): "
              f"`{json.dumps(out['limits'])}`", "",
              "Real cascade runs (compiled plan, guards evaluated by the executor) vs the derivation: "
              f"`{json.dumps(out['check_real_cascade_run'])}`", "", f"Summary: `{json.dumps(out['summary'])}`", ""]
    path.write_text("\n".join(lines))


def plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    sw = out["sweep"]
    ax.plot([r["param_compute_per_part"] for r in sw], [r["accuracy"] for r in sw], "o-", color="tab:blue",
            label="cascade, threshold sweep")
    for r in sw:
        ax.annotate(f"{r['threshold']:g}", (r["param_compute_per_part"], r["accuracy"]), fontsize=7,
                    textcoords="offset points", xytext=(3, 3))
    for s, c in zip(out["systems"][:2], ("tab:green", "tab:red")):
        x, y = s["param_compute_per_part"], s["accuracy"]
        ax.errorbar([x], [y], yerr=[[y - s["ci95"][0]], [s["ci95"][1] - y]], fmt="s", color=c, capsize=3,
                    label=s["system"])
    ax.set_xlabel("parameter-compute per answered part (params x tokens, 1e9)")
    ax.set_ylabel(f"accuracy (n = {out['setup']['n_parts']} meqa_p parts)")
    ax.set_title("Cascade 0.5B -> 1.5B: accuracy vs compute")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
