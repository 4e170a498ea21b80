"""Collect benchmark runs into markdown tables, plots and one JSON: the numbers the README quotes.

    .venv/bin/python experiments/report.py [--runs experiments/results/runs] [--count-parameters]

Every run dir (`<runs>/<experiment>/<job>/`) holds results.jsonl (raw answers) and .hydra/config.yaml; scores
are recomputed here from the raw answers (compllm/bench/scoring.py), never read from run-time summaries.
`--count-parameters` counts each configured model's parameters from its converted HF config on the meta
device (no weights loaded) into model_parameters.json; later reports read that file.
Writes <runs>/../report.md, report.json and report_*.png.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import yaml  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from compllm.bench.compute import NotEstimable, calls_of, estimated_calls, hf_counters, param_compute  # noqa: E402
from compllm.bench.scoring import bootstrap_ci, score, summarize  # noqa: E402
from compllm.bench.store import read_results  # noqa: E402

RESULTS = ROOT / "experiments" / "results"


@dataclass
class Run:
    experiment: str
    job: str
    config: dict[str, Any]
    records: list[dict[str, Any]] = field(default_factory=list)

    @property
    def models(self) -> list[str]:
        """Distinct model names the run loads: a monolithic system its one model, a composed one every model
        its roles name (experts sharing one model count once)."""
        system = self.config["system"]
        if system["_target_"].endswith("Monolithic"):
            return [self.config["models"][system.get("model", "default")]["name"]]
        return sorted({m["name"] for m in self.config["models"].values()})


def load_runs(root: Path) -> list[Run]:
    runs = []
    for results in sorted(root.glob("*/*/results.jsonl")):
        cfg_path = results.parent / ".hydra" / "config.yaml"
        if not cfg_path.exists():
            continue
        _, records = read_results(results)
        runs.append(Run(results.parent.parent.name, results.parent.name, yaml.safe_load(cfg_path.read_text()),
                        records))
    return runs


def converted_dir(spec: dict[str, Any]) -> str:
    """The converted HF directory of a run's model spec (converted once, then read from the model cache)."""
    from hydra.utils import instantiate

    return instantiate(spec["source"]).materialize(None, "bfloat16").path


def count_parameters(runs: list[Run], out: Path) -> dict[str, int]:
    """Parameters per model name, from the converted HF config, instantiated on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    counts = json.loads(out.read_text()) if out.exists() else {}
    for run in runs:
        for spec in run.config["models"].values():
            if spec["name"] in counts:
                continue
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(converted_dir(spec)))
            counts[spec["name"]] = sum(p.numel() for p in model.parameters())
    out.write_text(json.dumps(counts, indent=1, sort_keys=True))
    return counts


def answer_calls(runs: list[Run], out: Path, estimate: bool) -> dict[str, dict[str, Any]]:
    """Per run (`experiment/job`) and item: the model calls its answer made (`compllm.bench.compute`): recorded in
    the record when it has them; else the estimate cached in `out` (`--estimate-compute` adds what is missing,
    rebuilding each call's prompt and counting its tokens with the model's tokenizer; None: not estimable)."""
    cached: dict[str, dict[str, Any]] = json.loads(out.read_text()) if out.exists() else {}
    counters: dict[str, tuple] = {}  # model name -> (count_prompt, count_text), one tokenizer load per model
    calls: dict[str, dict[str, Any]] = {}
    for run in runs:
        key, est = f"{run.experiment}/{run.job}", cached.setdefault(f"{run.experiment}/{run.job}", {})
        todo = [r for r in run.records if calls_of(r) is None and r["id"] not in est] if estimate else []
        if todo:
            models = run.config["models"]
            for spec in models.values():
                if spec["name"] not in counters:
                    counters[spec["name"]] = hf_counters(converted_dir(spec))
            prompt = {a: counters[m["name"]][0] for a, m in models.items()}
            text = {a: counters[m["name"]][1] for a, m in models.items()}
            for r in todo:
                try:
                    est[r["id"]] = estimated_calls(r, run.config, prompt, text)
                except NotEstimable:
                    est[r["id"]] = None
        for r in run.records:
            recorded = calls_of(r)
            if recorded is not None:
                calls.setdefault(key, {})[r["id"]] = {"calls": recorded, "how": "recorded"}
            elif est.get(r["id"]) is not None:
                calls.setdefault(key, {})[r["id"]] = {"calls": est[r["id"]], "how": "estimated"}
    if estimate:
        out.write_text(json.dumps({k: v for k, v in cached.items() if v}, indent=0, sort_keys=True))
    return calls


def compute_per_part(run: Run, calls: dict[str, dict[str, Any]], params: dict[str, int],
                     ids: set[str]) -> tuple[float | None, str]:
    """Parameters x tokens per answered part over the items `ids`, and whether recorded or estimated (None when
    some item's calls are unknown)."""
    mine = calls.get(f"{run.experiment}/{run.job}", {})
    by_alias = {alias: params.get(spec["name"]) for alias, spec in run.config["models"].items()}
    records = [r for r in run.records if r["id"] in ids]
    if not records or any(r["id"] not in mine for r in records) or None in by_alias.values():
        return None, ""
    total = sum(param_compute(mine[r["id"]]["calls"], by_alias) for r in records)
    hows = {mine[r["id"]]["how"] for r in records}
    return total / sum(len(r["parts"]) for r in records), "/".join(sorted(hows))


def fmt_ci(value: float, ci: tuple[float, float]) -> str:
    return f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"


def num(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def total_params(run: Run, params: dict[str, int]) -> int | None:
    try:
        return sum(params[m] for m in run.models)
    except KeyError:
        return None


def accuracy_table(runs: list[Run], params: dict[str, int], common: set[str],
                   calls: dict[str, dict[str, Any]]) -> tuple[str, dict]:
    rows, data = [], {}
    for run in runs:
        s = summarize(x for x in run.records if x["id"] in common).get("meqa")
        p = total_params(run, params)
        if not s or not p:
            continue
        chunk = (run.config.get("task") or {}).get("chunk_size")  # items answered together: latency is the chunk's
        compute, how = compute_per_part(run, calls, params, common)
        data[run.job] = {**s, "models": run.models, "total_parameters": p, "chunk_size": chunk,
                         "param_compute_per_part": compute, "param_compute_from": how}
        shown = "-" if compute is None else f"{compute / 1e9:.0f} ({how})"
        rows.append((s["part_accuracy"], f"| {run.job} | {', '.join(run.models)} | "
                     f"{p / 1e9:.2f}B | {s['n']} ({s['parts']} parts) | {fmt_ci(s['part_accuracy'], s['part_accuracy_ci95'])}"
                     f" | {fmt_ci(s['all_correct'], s['all_correct_ci95'])} | {s['unparsed_parts']} | {shown} | "
                     f"{s['median_latency_s']:.1f} ({chunk}) |"))
    table = ("| system | model(s) | total parameters | items | per-part accuracy [95% CI] | all parts correct [95% CI] "
             "| parts without a parsable letter | param-compute per part, 1e9 | median latency s (items per chunk) |"
             "\n|---|---|---|---|---|---|---|---|---|\n" + "\n".join(r for _, r in sorted(rows, reverse=True)))
    return (table if rows else ""), data


def common_ids(runs: list[Run]) -> set[str]:
    return set.intersection(*(set(x["id"] for x in r.records) for r in runs)) if runs else set()


def accuracy_section(runs: list[Run], params: dict[str, int], out_dir: Path,
                     calls: dict[str, dict[str, Any]]) -> tuple[str, dict]:
    """Every system scored on the same items: those all of them answered (runs may have different limits);
    then, where some systems ran more items, those systems again on their larger common set."""
    runs = [r for r in runs if r.records]
    common = common_ids(runs)
    table, data = accuracy_table(runs, params, common, calls)
    if not table:
        return "", data
    larger = [r for r in runs if len(r.records) > len(common)]
    if len(larger) >= 2:
        more, more_data = accuracy_table(larger, params, common_ids(larger), calls)
        compute_plot(more_data, out_dir, len(common_ids(larger)))  # the larger sample: the claim-1 systems
    else:
        compute_plot(data, out_dir, len(common))
    if len(larger) >= 2:
        table += f"\n\nThe systems that ran more items, on the {len(common_ids(larger))} items they share:\n\n" + more
    stages = ["| system | " + " | ".join(STAGES) + " | parts routed to their domain's expert | expert accuracy "
              "(before aggregation) |", "|---|" + "---|" * (len(STAGES) + 2)]
    for job, s in data.items():
        if s.get("stages"):
            stages.append(f"| {job} | " + " | ".join(str(s["stages"].get(k, 0)) for k in STAGES)
                          + f" | {pct(s['routed_to_domain'])} | {num(s['expert_accuracy'])} |")
    # accuracy vs total parameters
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for job, s in data.items():
        if s["total_parameters"]:
            lo, hi = s["part_accuracy_ci95"]
            composed = not job.startswith("monolithic")
            ax.errorbar(s["total_parameters"] / 1e9, s["part_accuracy"],
                        yerr=[[s["part_accuracy"] - lo], [hi - s["part_accuracy"]]],
                        fmt="o" if composed else "s", color="tab:blue" if composed else "tab:gray", capsize=3)
            ax.annotate(job, (s["total_parameters"] / 1e9, s["part_accuracy"]), textcoords="offset points",
                        xytext=(5, 4), fontsize=8)
    ax.axhline(0.25, ls=":", color="k", lw=0.8, label="chance (4 options)")
    ax.set_xscale("log")
    ticks = sorted({s["total_parameters"] / 1e9 for s in data.values() if s["total_parameters"]})
    ax.set_xticks(ticks, [f"{t:.2f}B" for t in ticks])
    ax.xaxis.set_minor_locator(plt.NullLocator())
    ax.set_xlim(ticks[0] / 1.4, ticks[-1] * 1.6)  # room for the labels
    ax.set_xlabel("total parameters loaded (log scale)")
    ax.set_ylabel("meqa_p per-part accuracy")
    ax.set_title("Accuracy vs size (95% bootstrap CIs; circles: compllm, squares: one model)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "report_accuracy_vs_size.png", dpi=120)
    plt.close(fig)
    return table + "\n\nWhere composed systems lost each part (counted per part):\n\n" + "\n".join(stages), data


STAGES = ["correct", "split", "expert_wrong", "expert_wrong_misrouted", "aggregation"]


def compute_plot(data: dict, out_dir: Path, n_items: int) -> None:
    """Per-part accuracy against parameter-compute per part: the meqa_p systems (their common items), and the
    cascade's threshold sweep, the mixed team and each model alone from `bench_cascade.json` (gold parts on
    llama.cpp: the same questions and expert prompts, another engine and sample, so drawn apart)."""
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    for job, s in data.items():
        if s.get("param_compute_per_part"):
            x, (lo, hi) = s["param_compute_per_part"] / 1e9, s["part_accuracy_ci95"]
            composed = not job.startswith("monolithic")
            ax.errorbar(x, s["part_accuracy"], yerr=[[s["part_accuracy"] - lo], [hi - s["part_accuracy"]]],
                        fmt="o" if composed else "s", color="tab:blue" if composed else "tab:gray", capsize=3)
            ax.annotate(job, (x, s["part_accuracy"]), textcoords="offset points", xytext=(5, 4) if composed else (-6, 4),
                        ha="left" if composed else "right", fontsize=7)
    cascade_file = out_dir / "bench_cascade.json"
    if cascade_file.exists():
        cascade = json.loads(cascade_file.read_text())
        sweep = sorted(cascade["sweep"], key=lambda r: r["param_compute_per_part"])
        ax.plot([r["param_compute_per_part"] for r in sweep], [r["accuracy"] for r in sweep], "-^", ms=4,
                color="tab:orange", label=f"cascade 0.5B->1.5B, threshold sweep ({cascade['setup']['n_parts']} gold "
                "parts, llama.cpp)")
        for r in cascade["systems"]:
            if r["system"].startswith(("0.5B alone", "1.5B alone", "mixed team")):
                ax.plot(r["param_compute_per_part"], r["accuracy"], "D", color="tab:red", ms=5)
                ax.annotate(r["system"].split(" (")[0] + " (llama.cpp)", (r["param_compute_per_part"], r["accuracy"]),
                            textcoords="offset points", xytext=(-6, -12), ha="right", fontsize=7, color="tab:red")
    ax.axhline(0.25, ls=":", color="k", lw=0.8, label="chance (4 options)")
    ax.set_xscale("log")
    ax.set_xlabel("parameter-compute per answered part: parameters x tokens, 1e9 (log scale)")
    ax.set_ylabel("meqa_p per-part accuracy")
    ax.set_title(f"Accuracy vs compute (meqa_p; circles: compllm, squares: one model, {n_items} items; 95% CIs)",
                 fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(out_dir / "report_accuracy_vs_compute.png", dpi=120)
    plt.close(fig)


def latency_section(runs: list[Run], out_dir: Path, name: str) -> tuple[str, dict]:
    """Per-query latency of each system of one latency experiment against its `sequential` job, on common items."""
    by_job = {r.job: r for r in runs if r.records}
    if "sequential" not in by_job:
        return "", {}
    base = by_job["sequential"]
    base_answers = {r["id"]: r["answer"]["final_answer"] for r in base.records}
    data, rows = {}, []
    kinds = sorted({r["kind"] for r in base.records})
    for job, run in by_job.items():
        common = [r for r in run.records if r["id"] in base_answers]
        if not common:
            continue
        lat = {k: statistics.median([r["answer"]["latency_s"] for r in common if r["kind"] == k] or [float("nan")])
               for k in kinds}
        lat["all"] = statistics.median(r["answer"]["latency_s"] for r in common)
        execute = [r["answer"].get("execute_latency_s") for r in common]
        lat["execute"] = statistics.median(execute) if None not in execute else float("nan")
        agree = sum(r["answer"]["final_answer"] == base_answers[r["id"]] for r in common) / max(len(common), 1)
        data[job] = {"n": len(common), "median_latency_s": lat, "answers_equal_sequential": agree}
    for job, d in data.items():
        base_lat = data["sequential"]["median_latency_s"]
        speed = base_lat["all"] / d["median_latency_s"]["all"]
        d["speedup_vs_sequential"] = speed
        d["execute_speedup_vs_sequential"] = base_lat["execute"] / d["median_latency_s"]["execute"]
        rows.append(f"| {job} | {d['n']} | " + " | ".join(f"{d['median_latency_s'][k]:.1f}" for k in kinds)
                    + f" | {d['median_latency_s']['all']:.1f} | {speed:.2f}x | {d['median_latency_s']['execute']:.1f}"
                    f" | {d['execute_speedup_vs_sequential']:.2f}x | {d['answers_equal_sequential']:.0%} |")
    head = ("| system | items | " + " | ".join(f"median latency s: {k}" for k in kinds)
            + " | median latency s: all | speedup vs sequential | median sub-query processing s | its speedup "
              "| final answers = sequential |\n|---|---|" + "---|" * (len(kinds) + 5))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    width = 0.8 / len(data)
    for i, (job, d) in enumerate(data.items()):
        xs = [j + i * width for j in range(len(kinds) + 1)]
        ax.bar(xs, [d["median_latency_s"][k] for k in [*kinds, "all"]], width, label=job)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(kinds) + 1)], [*kinds, "all"])
    ax.set_ylabel("median per-query latency (s)")
    ax.set_ylim(0, 1.25 * max(d["median_latency_s"]["all"] for d in data.values()))  # room for the legend
    ax.legend(fontsize=8, ncol=len(data))
    ax.set_title(name, fontsize=9)
    fig.tight_layout()
    fig.savefig(out_dir / f"report_{name}.png", dpi=120)
    plt.close(fig)
    return head + "\n" + "\n".join(rows), data


def edges(dq: dict) -> str:
    """Dependency-edge precision / recall; undefined (no predicted or no gold edges) reads as a dash."""
    p, r = dq.get("edge_precision", float("nan")), dq.get("edge_recall", float("nan"))
    return " / ".join("-" if math.isnan(x) else f"{x:.2f}" for x in (p, r))


def quality_section(runs: list[Run]) -> tuple[str, dict]:
    """FanOutQA and StrategyQA metrics of every run that has them (meqa_all runs)."""
    rows, data = [], {}
    for run in runs:
        s = summarize(run.records)
        f, q = s.get("fanoutqa"), s.get("strategyqa")
        if not (f or q):
            continue
        data[f"{run.experiment}/{run.job}"] = {"fanoutqa": f, "strategyqa": q}
        dq = (f or {}).get("decomposition", {})
        rows.append(f"| {run.experiment}/{run.job} | {f['n'] if f else 0} | "
                    + (f"{fmt_ci(f['containment'], f['containment_ci95'])} | {f['f1']:.3f} | " if f else "- | - | ")
                    + (f"{dq.get('n_pred', float('nan')):.1f} vs {dq.get('n_gold', float('nan')):.1f} | "
                       f"{dq.get('node_recall', float('nan')):.2f} | {edges(dq)} | " if dq else "- | - | - | ")
                    + (f"{q['n']} | {fmt_ci(q['correct'], q['correct_ci95'])} |" if q else "0 | - |"))
    head = ("| run | FanOutQA items | answer containment [95% CI] | token F1 | sub-questions (pred vs gold) | "
            "gold sub-questions matched | dependency edges P / R | StrategyQA items | StrategyQA accuracy [95% CI] |\n"
            "|---|---|---|---|---|---|---|---|---|")
    return (head + "\n" + "\n".join(rows)) if rows else "", data


def ablation_section(runs: list[Run], out_dir: Path) -> tuple[str, dict]:
    parts, data = [], {}
    for experiment in sorted({r.experiment for r in runs if r.experiment.startswith("ablation_")}):
        rows = []
        for run in (r for r in runs if r.experiment == experiment):
            s = summarize(run.records)
            meqa = s.get("meqa", {})
            lat = statistics.median(r["answer"]["latency_s"] for r in run.records) if run.records else float("nan")
            data.setdefault(experiment, {})[run.job] = {"n": len(run.records), "median_latency_s": lat,
                                                         "part_accuracy": meqa.get("part_accuracy")}
            acc = f"{meqa['part_accuracy']:.3f}" if meqa else "-"
            rows.append(f"| {run.job} | {len(run.records)} | {acc} | {lat:.1f} |")
        parts.append(f"**{experiment}**\n\n| setting | items | per-part accuracy on its meqa_p items | median latency s |\n"
                     "|---|---|---|---|\n" + "\n".join(rows))
        d = data[experiment]
        fig, ax = plt.subplots(figsize=(6, 3))
        ax.bar(range(len(d)), [v["median_latency_s"] for v in d.values()], color="tab:blue")
        ax.set_xticks(range(len(d)), list(d), rotation=20, fontsize=7, ha="right")
        ax.set_ylabel("median latency (s)")
        ax.set_title(experiment, fontsize=9)
        fig.tight_layout()
        fig.savefig(out_dir / f"report_{experiment}.png", dpi=120)
        plt.close(fig)
    return "\n\n".join(parts), data


#: compiled system -> the monolithic model of the same size (claim 1 compares them per part)
SIZE_PAIRS = {"135M": ("compiled_135m", "monolithic_135m"), "0.5B": ("compiled", "monolithic"),
              "1.5B": ("compiled_1.5b", "monolithic_1.5b")}
#: summary key -> (benchmark result file written by experiments/bench_*.py, key in its `summary`)
BENCH_KEYS = {"cascade_vs_mono15_points": ("bench_cascade.json", "cascade_vs_mono15_points"),
              "cascade_compute_ratio": ("bench_cascade.json", "cascade_compute_ratio"),
              # headline: recall over every item with gold edges (items where no two predicted parts match gold count
              # 0); the metric over matched items only, and the share of items it is defined on, come with it
              "fanoutqa_edge_recall": ("bench_planner.json", "fanoutqa_edge_recall_strict"),
              "fanoutqa_edge_recall_matched_items": ("bench_planner.json", "fanoutqa_edge_recall"),
              "fanoutqa_edge_recall_defined_share": ("bench_planner.json", "fanoutqa_edge_defined"),
              "fanoutqa_count_ratio": ("bench_planner.json", "fanoutqa_count_ratio"),
              "retrieval_gain_fanoutqa_points": ("bench_retrieval.json", "retrieval_gain_fanoutqa_points"),
              "retrieval_gain_strategyqa_points": ("bench_retrieval.json", "retrieval_gain_strategyqa_points")}


def paired_margin(comp: Run, mono: Run, ids: set[str]) -> dict:
    """Compiled minus monolithic per-part accuracy on the same items: the margin, its paired bootstrap CI (items
    resampled together for both systems) and a paired sign-flip permutation p-value (two-sided)."""
    def per_item(run: Run) -> dict[str, tuple[float, int]]:
        out = {}
        for r in run.records:
            if r["id"] in ids:
                sc = score(r)
                out[r["id"]] = (float(sum(sc["part_correct"])), sc["parts"])
        return out

    c, m = per_item(comp), per_item(mono)
    keys = sorted(ids)
    diffs, parts = [c[k][0] - m[k][0] for k in keys], [c[k][1] for k in keys]
    margin = sum(diffs) / sum(parts)
    rng, observed, extreme, perms = random.Random(0), abs(sum(diffs)), 0, 10000
    for _ in range(perms):
        extreme += abs(sum(d if rng.random() < 0.5 else -d for d in diffs)) >= observed - 1e-9
    return {"margin_points": 100 * margin, "paired_ci95_points": [100 * x for x in bootstrap_ci(diffs, weights=parts)],
            "p_value": (extreme + 1) / (perms + 1), "n": len(keys), "parts": sum(parts),
            "compiled": sum(c[k][0] for k in keys) / sum(parts), "monolithic": sum(m[k][0] for k in keys) / sum(parts)}


def summary_section(runs: list[Run], acc: dict, out_dir: Path) -> tuple[str, dict]:
    """The decisive numbers in one object, from the raw results: claim 1 per size from the six accuracy runs on
    the items all six answered (paired: the same items for both systems of a size), the cascade, planner and
    retrieval numbers from their benchmarks' own summaries (null where one has not run)."""
    by_job = {r.job: r for r in runs if r.records}
    pairs = {size: pair for size, pair in SIZE_PAIRS.items() if all(j in by_job for j in pair)}
    ids = common_ids([by_job[j] for pair in pairs.values() for j in pair])
    margins, lines = {}, ["| size | compiled | monolithic | margin, points [paired 95% CI] | p (paired permutation) "
                          "| separate CIs overlap |", "|---|---|---|---|---|---|"]
    for size, (comp, mono) in pairs.items():
        pm = paired_margin(by_job[comp], by_job[mono], ids)
        sc = summarize(x for x in by_job[comp].records if x["id"] in ids)["meqa"]
        sm = summarize(x for x in by_job[mono].records if x["id"] in ids)["meqa"]
        overlap = sc["part_accuracy_ci95"][0] <= sm["part_accuracy_ci95"][1]
        margins[size] = {**pm, "ci_overlap": overlap}
        lo, hi = pm["paired_ci95_points"]
        lines.append(f"| {size} | {fmt_ci(sc['part_accuracy'], sc['part_accuracy_ci95'])} | "
                     f"{fmt_ci(sm['part_accuracy'], sm['part_accuracy_ci95'])} | {pm['margin_points']:+.1f} "
                     f"[{lo:+.1f}, {hi:+.1f}] | {pm['p_value']:.4f} | {overlap} |")
    missing = [size for size in SIZE_PAIRS if size not in pairs]  # a size without both runs decides nothing
    for size in missing:
        lines.append(f"| {size} | not run | not run | - | - | - |")
    summary: dict = {"n_meqa_p": 0 if missing else min((v["n"] for v in margins.values()), default=0),
                     "claim1_min_margin_points": None if missing else min(
                         (v["margin_points"] for v in margins.values()), default=None),
                     "claim1_by_size": margins, "claim1_missing_sizes": missing}
    sources = {}
    for key, (fname, field_) in BENCH_KEYS.items():
        path = out_dir / fname
        value = json.loads(path.read_text()).get("summary", {}).get(field_) if path.exists() else None
        summary[key] = value
        sources[key] = f"{fname}: {value}" if value is not None else f"{fname}: not run"
    md = ("Claim 1 per size (meqa_p per-part accuracy, compiled minus the monolithic model of the same size; "
          f"the {summary['n_meqa_p']} items all six systems answered):\n\n" + "\n".join(lines) + "\n\nFrom the benchmarks' own "
          "summaries (`experiments/bench_cascade.py`, `bench_planner.py`, `bench_retrieval.py`):\n\n"
          + "\n".join(f"- `{k}`: {v}" for k, v in sources.items()))
    return md, summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", default=str(RESULTS / "runs"))
    ap.add_argument("--count-parameters", action="store_true")
    ap.add_argument("--estimate-compute", action="store_true", help="count the tokens of the calls of records that "
                    "do not carry them (older runs), into answer_calls_estimated.json; later reports read that file")
    args = ap.parse_args()
    root = Path(args.runs)
    out_dir = root.parent
    runs = load_runs(root)
    if not runs:
        sys.exit(f"no runs under {root}: run e.g. `compllm -m experiment=paper_accuracy` first")
    params_file = out_dir / "model_parameters.json"
    params = count_parameters(runs, params_file) if args.count_parameters else (
        json.loads(params_file.read_text()) if params_file.exists() else {})
    accuracy_runs = [r for r in runs if r.experiment == "paper_accuracy"]
    calls = answer_calls(accuracy_runs, out_dir / "answer_calls_estimated.json", args.estimate_compute)
    acc_md, acc = accuracy_section(accuracy_runs, params, out_dir, calls)
    lat, lat_md = {}, []
    for name in sorted({r.experiment for r in runs if r.experiment.startswith("paper_latency")}):
        section, lat[name] = latency_section([r for r in runs if r.experiment == name], out_dir, name)
        if section:
            lat_md += [f"**{name}** (`compllm -m experiment={name}`)", section, f"![{name}](report_{name}.png)"]
    q_md, q = quality_section(runs)
    ab_md, ab = ablation_section(runs, out_dir)
    sum_md, summary = summary_section([r for r in runs if r.experiment == "paper_accuracy"], acc, out_dir)
    md = ["# compllm experiment report", "Generated by `.venv/bin/python experiments/report.py` from the raw answers "
          "in experiments/results/runs/.",
          "## Summary", sum_md,
          "## Accuracy and size (meqa_p; `compllm -m experiment=paper_accuracy`, `experiment=paper_size`)", acc_md,
          "![accuracy vs compute](report_accuracy_vs_compute.png)", "![accuracy vs size](report_accuracy_vs_size.png)",
          "## Latency (meqa_all)", *lat_md,
          "## FanOutQA and StrategyQA (meqa_all runs)", q_md, "## Ablations (`compllm -m experiment=ablation_*`)", ab_md]
    (out_dir / "report.md").write_text("\n\n".join(x for x in md if x) + "\n", encoding="utf-8")
    (out_dir / "report.json").write_text(json.dumps({"accuracy": acc, "latency": lat, "quality": q, "ablations": ab,
                                                     "parameters": params, "summary": summary}, indent=1, default=str))
    print((out_dir / "report.md").read_text())


if __name__ == "__main__":
    main()
