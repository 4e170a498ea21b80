"""Retrieval-grounded compiled vs closed-book compiled, on the same items with the same split.

    PYTHONPATH=$PWD .venv/bin/python experiments/bench_retrieval.py [--n 50] [--model qwen2.5-coder-0.5b-llamacpp]
    PYTHONPATH=$PWD .venv/bin/python experiments/bench_retrieval.py --compare-index-only   # BM25 vs MiniLM only

Items: the first `--n` FanOutQA dev questions with <= 6 gold sub-questions (`compllm.bench.meqa.fanoutqa_items`)
and `--n` StrategyQA questions (fixed-seed sample, `strategyqa_items`), the ones `benchmark=meqa_all` uses
(`--n-fanoutqa` / `--n-strategyqa` set each; `--fanoutqa-all`: every FanOutQA dev question less the planner's
exemplars, 307, as `bench_planner.py`).
Per chunk of `--chunk` items, the planner splits the queries once (`Pipeline.decompose`) and both systems answer
that same decomposition (`Pipeline.run(decompositions=...)`) on the same loaded model: `retrieval` is
`experts=retrieval` (each sub-query first looks its question up in the Wikipedia summaries, a retrieve node;
domain experts read their topics), `closed_book` is the same experts with `knowledge` removed. So the accuracy
difference is retrieval's alone. The fair control (`--monolithic`, on by default): the same loaded model answers
each whole query with a plain assistant prompt, closed-book (`monolithic`) and with the passages the same index
finds for the whole question quoted before it (`monolithic_retrieval`, `conf/system/monolithic_retrieval.yaml`):
does retrieval help the team more than it helps one model? Scores are compllm's scorers (`compllm.bench.scoring.score`): FanOutQA loose
accuracy (answer containment), StrategyQA accuracy.

Retrieval hit rates (the stage table, so misses are visible):
- FanOutQA: `evidence_in_corpus` (a gold evidence page of the question is one of the corpus's 10,033 articles),
  `evidence_retrieved` (a retrieved passage is such a page), `answer_in_passages` (loose accuracy of the
  retrieved passages' text, joined: how much of the gold answer the expert could have copied);
- StrategyQA: `fact_in_passages` (some gold supporting fact has >= 60% of its content words in one retrieved
  passage: the facts are annotators' sentences, not Wikipedia's, so verbatim containment would never fire).
Stage of each item under retrieval: `retrieval miss` (no hit), `hit, answer wrong` (the passage was there and
the answer is still wrong: wrong passage chosen or passage ignored), `correct`.

Index comparison (`index_comparison`): BM25 (bm25s) vs the shipped all-MiniLM-L6-v2 embeddings (cosine, exact
search) on the same items' whole questions, top-2, the same hit definitions, over a method-independent haystack
(`compare_indexes`).

Writes experiments/results/bench_retrieval.json after every chunk (a rerun resumes) and bench_retrieval.md.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shlex
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
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from compllm.bench.items import BenchItem  # noqa: E402
from compllm.bench.meqa import fanoutqa_items, strategyqa_items  # noqa: E402
from compllm.bench.scoring import bootstrap_ci, score  # noqa: E402
from compllm.data.textmetrics import answer_containment, normalize  # noqa: E402

SYSTEMS = ("closed_book", "retrieval")
MONOLITHIC = ("monolithic", "monolithic_retrieval")  # the fair control: the whole query, one model
FACT_RECALL = 0.6  # a StrategyQA fact "is in" a passage when this share of its content words is
_STOP = set("a an the of in on at to for and or is are was were be by with as from that this it its his her their "
            "than then did does do has have had not no yes which who what when where how why".split())


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from compllm.config.schema import register

    register()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose("config", overrides=overrides)


def content_words(text: str) -> set[str]:
    return {w for w in normalize(text).split() if w not in _STOP and len(w) > 1}


def fact_in(facts: list[str], passages: list[dict]) -> bool:
    for fact in facts:
        words = content_words(fact)
        if not words:
            continue
        for p in passages:
            have = content_words(f"{p['title']} {p['text']}")
            if len(words & have) / len(words) >= FACT_RECALL:
                return True
    return False


def evidence_titles() -> dict[str, set[str]]:
    """FanOutQA question id -> the Wikipedia page titles its gold sub-questions cite as evidence (any depth)."""
    from compllm.data.fanoutqa import fanoutqa_dev_path

    def walk(subs):
        for s in subs or ():
            ev = s.get("evidence")
            if isinstance(ev, dict) and ev.get("title"):
                yield ev["title"]
            yield from walk(s.get("decomposition"))

    rows = json.loads(fanoutqa_dev_path().read_text(encoding="utf-8"))
    return {f"fanoutqa-{r['id']}": set(walk(r["decomposition"])) for r in rows}


def hits_of(item: BenchItem, passages: list[dict], evidence: dict[str, set[str]], titles: set[str]) -> dict:
    if item.kind == "fanoutqa":
        gold_pages = evidence.get(item.id, set())
        text = " ".join(f"{p['title']} {p['text']}" for p in passages)
        return {"evidence_in_corpus": bool(gold_pages & titles),
                "evidence_retrieved": bool(gold_pages & {p["title"] for p in passages}),
                "answer_in_passages": answer_containment(text, item.gold["answer_strings"]) if text else 0.0}
    return {"fact_in_passages": fact_in([p["fact"] for p in item.parts], passages)}


def hit(item: BenchItem, h: dict) -> bool:
    return (h["evidence_retrieved"] or h["answer_in_passages"] > 0) if item.kind == "fanoutqa" else h["fact_in_passages"]


def run_chunk(rag, closed, items: list[BenchItem]) -> dict[str, dict[str, Any]]:
    queries = [it.query for it in items]
    start = time.perf_counter()
    decompositions = rag.decompose(rag.context(), queries, [])
    split_s = (time.perf_counter() - start) / len(items)
    out: dict[str, dict[str, Any]] = {it.id: {"item": it.to_dict(), "split_s": split_s} for it in items}
    for name, pipe in (("closed_book", closed), ("retrieval", rag)):
        start = time.perf_counter()
        result, _ = pipe.run(queries, decompositions=decompositions)
        wall = time.perf_counter() - start
        for it, q in zip(items, result.queries):
            passages = [p for n in q.nodes if n.kind == "retrieve" and n.ok for p in json.loads(n.answer or "[]")]
            parts = [{"text": n.prompt, "answer": n.answer, "status": n.status, "expert": n.expert}
                     for n in q.nodes if n.kind == "subquery"]
            record = {**it.to_dict(), "answer": {"final_answer": q.final_answer, "latency_s": q.latency,
                                                 "partial": q.partial}}
            out[it.id][name] = {"final_answer": q.final_answer, "score": score(record), "parts": parts,
                                "passages": passages, "wall_s_per_item": wall / len(items),
                                "lookups": [{"question": n.prompt, "titles": [p["title"] for p in
                                                                              json.loads(n.answer or "[]")]}
                                            for n in q.nodes if n.kind == "retrieve" and n.ok]}
    return out


def monolithic_systems() -> dict[str, Any]:
    """The control systems, conf/system/monolithic{,_retrieval}.yaml instantiated as a benchmark would (once: the
    retrieval one keeps its loaded index)."""
    from hydra.utils import instantiate

    return {name: instantiate(compose([f"system={name}"]).system) for name in MONOLITHIC}


def run_monolithic_chunk(pipe, systems: dict[str, Any], items: list[BenchItem]) -> dict[str, dict[str, Any]]:
    """The control systems on these items: the whole query to the model, closed-book and with the whole
    question's passages."""
    out: dict[str, dict[str, Any]] = {it.id: {} for it in items}
    queries = [it.query for it in items]
    for name, system in systems.items():
        start = time.perf_counter()
        answers, found = system.answer_reading(pipe, queries)
        wall = time.perf_counter() - start
        for it, a, passages in zip(items, answers, found):
            record = {**it.to_dict(), "answer": {"final_answer": a.final_answer, "latency_s": a.latency_s,
                                                 "partial": False}}
            out[it.id][name] = {"final_answer": a.final_answer, "score": score(record), "passages": passages,
                                "wall_s_per_item": wall / len(items)}
    return out


def metric(kind: str) -> str:
    return "containment" if kind == "fanoutqa" else "correct"


def summarize(rows: dict[str, dict], items: list[BenchItem], evidence, titles) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for kind in ("fanoutqa", "strategyqa"):
        its = [it for it in items if it.kind == kind and it.id in rows]
        if not its:
            continue
        m = metric(kind)
        s: dict[str, Any] = {"n": len(its), "metric": "loose accuracy" if kind == "fanoutqa" else "accuracy"}
        for name in SYSTEMS:
            vals = [float(rows[it.id][name]["score"][m]) for it in its]
            s[name] = {"mean": statistics.fmean(vals), "ci95": bootstrap_ci(vals),
                       "median_wall_s_per_item": statistics.median(rows[it.id][name]["wall_s_per_item"] for it in its)}
            if kind == "strategyqa":  # no yes/no found in the final answer: scored wrong
                s[name]["unparsed"] = sum(bool(rows[it.id][name]["score"].get("unparsed")) for it in its)
        diffs = [float(rows[it.id]["retrieval"]["score"][m]) - float(rows[it.id]["closed_book"]["score"][m])
                 for it in its]
        s["gain_points"] = 100 * statistics.fmean(diffs)
        s["gain_ci95_points"] = [100 * x for x in bootstrap_ci(diffs)]
        hs = [hits_of(it, rows[it.id]["retrieval"]["passages"], evidence, titles) for it in its]
        s["hit_rates"] = {k: statistics.fmean(float(h[k]) for h in hs) for k in hs[0]}
        stages = {"retrieval miss": 0, "hit, answer wrong": 0, "hit, correct": 0, "miss, correct": 0}
        for it, h in zip(its, hs):
            ok = float(rows[it.id]["retrieval"]["score"][m]) >= (1.0 if kind == "strategyqa" else 0.5)
            if ok:
                stages["hit, correct" if hit(it, h) else "miss, correct"] += 1
            else:
                stages["hit, answer wrong" if hit(it, h) else "retrieval miss"] += 1
        s["stages"] = stages
        cb = [float(rows[it.id]["closed_book"]["score"][m]) for it in its]
        rg = [float(rows[it.id]["retrieval"]["score"][m]) for it in its]
        s["helped"] = sum(r > c for r, c in zip(rg, cb))
        s["hurt"] = sum(r < c for r, c in zip(rg, cb))
        s["lookups_per_item"] = statistics.fmean(len(rows[it.id]["retrieval"]["lookups"]) for it in its)
        mono = [it for it in its if all(name in rows[it.id] for name in MONOLITHIC)]
        if mono:  # the fair control, on the items it has answered
            c = {name: [float(rows[it.id][name]["score"][m]) for it in mono] for name in (*SYSTEMS, *MONOLITHIC)}
            s["control"] = {"n": len(mono), **{name: {"mean": statistics.fmean(v), "ci95": bootstrap_ci(v)}
                                               for name, v in c.items()}}
            for key, (a, b) in {"monolithic_gain_points": ("monolithic_retrieval", "monolithic"),
                                "compiled_gain_points": ("retrieval", "closed_book"),
                                "compiled_vs_monolithic_with_retrieval_points": ("retrieval", "monolithic_retrieval"),
                                "compiled_vs_monolithic_closed_book_points": ("closed_book", "monolithic")}.items():
                d = [x - y for x, y in zip(c[a], c[b])]
                s["control"][key] = {"points": 100 * statistics.fmean(d), "ci95": [100 * x for x in bootstrap_ci(d)]}
            if kind == "strategyqa":
                s["control"]["unparsed"] = {name: sum(bool(rows[it.id][name]["score"].get("unparsed")) for it in mono)
                                            for name in MONOLITHIC}
                s["control"]["answer_bias"] = {name: answer_bias([rows[it.id] for it in mono], name)
                                               for name in (*SYSTEMS, *MONOLITHIC)}
        summary[kind] = s
    return summary


def answer_bias(rows: list[dict], name: str, reps: int = 2000) -> dict[str, Any]:
    """StrategyQA: how often system `name` says yes, and its balanced accuracy (the mean of its accuracy on the
    yes-questions and on the no-questions, with a bootstrap CI). A model that always says one word scores the
    base rate in accuracy but 0.5 here, so a gain in accuracy that comes from a shift of the yes-rate shows."""
    import random

    gold = [bool(r["item"]["gold"]["answer"]) for r in rows]
    correct = [bool(r[name]["score"]["correct"]) for r in rows]
    unparsed = [bool(r[name]["score"].get("unparsed")) for r in rows]
    said_yes = [g if c else (not g and not u) for g, c, u in zip(gold, correct, unparsed)]

    def rates(idx: list[int]) -> tuple[float, float]:  # accuracy on the yes-questions, on the no-questions
        out = []
        for want in (True, False):
            group = [correct[i] for i in idx if gold[i] is want]
            out.append(statistics.fmean(group) if group else 0.5)
        return out[0], out[1]

    rng, n = random.Random(0), len(rows)
    boot = sorted(statistics.fmean(rates([rng.randrange(n) for _ in range(n)])) for _ in range(reps))
    tpr, tnr = rates(list(range(n)))
    return {"yes_rate": statistics.fmean(said_yes), "gold_yes_rate": statistics.fmean(gold), "tpr": tpr, "tnr": tnr,
            "balanced_accuracy": (tpr + tnr) / 2, "balanced_ci95": [boot[int(0.025 * reps)], boot[int(0.975 * reps) - 1]]}


def compare_indexes(items: list[BenchItem], evidence, titles, router_cfg, distractors: int = 2000) -> dict[str, Any]:
    """BM25 vs MiniLM embeddings on the items' whole questions, top-2, the same hit definitions, over one haystack:
    every passage that counts as a hit for some item by the gold alone (a FanOutQA evidence page, a passage holding
    a StrategyQA fact) plus `distractors` random passages (seed 0). Embedding all 10,033 passages takes over
    20 CPU-minutes here, more than this shared machine gave; the haystack is method-independent, so the
    comparison is fair, though both hit rates are higher than on the whole corpus."""
    import random

    import numpy as np
    from hydra.utils import instantiate
    from sentence_transformers import SentenceTransformer

    from compllm.knowledge import BM25Index, Corpus, load_corpus

    corpus = load_corpus("wiki")
    gold_pages = set().union(*(evidence.get(it.id, set()) for it in items if it.kind == "fanoutqa"))
    facts = [content_words(p["fact"]) for it in items if it.kind == "strategyqa" for p in it.parts]
    facts = [f for f in facts if f]
    relevant = []
    for i, p in enumerate(corpus.passages):
        words = content_words(f"{p.title} {p.text}")
        if p.title in gold_pages or any(len(f & words) / len(f) >= FACT_RECALL for f in facts):
            relevant.append(i)
    rest = [i for i in range(len(corpus.passages)) if i not in set(relevant)]
    keep = sorted(set(relevant) | set(random.Random(0).sample(rest, min(distractors, len(rest)))))
    hay = Corpus("haystack", tuple(corpus.passages[i] for i in keep), corpus.sha256)
    questions = [it.query for it in items]
    start = time.perf_counter()
    bm25 = BM25Index.build(hay)
    bm = [[h.to_dict() for h in hs] for hs in bm25.search(questions, 2)]
    bm25_s = time.perf_counter() - start
    model = SentenceTransformer(instantiate(router_cfg.embedding_model).materialize().path, device="cpu")
    model.max_seq_length = 128
    start = time.perf_counter()
    emb = model.encode([f"{p.title}. {p.text}" for p in hay.passages], batch_size=32, normalize_embeddings=True,
                       convert_to_numpy=True, show_progress_bar=False)
    qe = model.encode(questions, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)
    top = np.argsort(-(qe @ emb.T), axis=1)[:, :2]
    mini_s = time.perf_counter() - start
    mini = [[{"title": hay.passages[i].title, "text": hay.passages[i].text} for i in row] for row in top]
    out: dict[str, Any] = {"items": len(items), "k": 2, "query": "the whole question",
                           "haystack": {"passages": len(keep), "relevant_by_gold": len(relevant),
                                        "random_distractors": len(keep) - len(relevant)},
                           "seconds": {"bm25_build_and_search": bm25_s, "minilm_embed_and_search": mini_s}}
    for name, found in (("bm25", bm), ("minilm", mini)):
        per_kind: dict[str, Any] = {}
        for kind in ("fanoutqa", "strategyqa"):
            hs = [(it, hits_of(it, f, evidence, titles)) for it, f in zip(items, found) if it.kind == kind]
            if hs:
                per_kind[kind] = {"n": len(hs), "hit_rate": statistics.fmean(float(hit(it, h)) for it, h in hs),
                                  **{k: statistics.fmean(float(h[k]) for _, h in hs) for k in hs[0][1]}}
        out[name] = per_kind
    return out


def table(summary: dict[str, Any], comparison: dict[str, Any] | None, meta: dict[str, Any]) -> str:
    lines = ["# Retrieval: compiled with retrieval vs closed-book compiled", "",
             f"Command: `{meta['command']}`  ", f"Model: {meta['model']}; machine: {meta['machine']}; "
             f"{meta['when']}", "",
             "| data set | n | metric | closed-book [95% CI] | with retrieval [95% CI] | gain, points [95% CI] | "
             "helped / hurt items | s per item (closed / retrieval) |", "|---|---|---|---|---|---|---|---|"]
    for kind, s in summary.items():
        if kind not in ("fanoutqa", "strategyqa"):
            continue
        c, r = s["closed_book"], s["retrieval"]
        lines.append(f"| {kind} | {s['n']} | {s['metric']} | {c['mean']:.3f} [{c['ci95'][0]:.3f}, {c['ci95'][1]:.3f}] "
                     f"| {r['mean']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}] | {s['gain_points']:+.1f} "
                     f"[{s['gain_ci95_points'][0]:+.1f}, {s['gain_ci95_points'][1]:+.1f}] | {s['helped']} / {s['hurt']} "
                     f"| {c['median_wall_s_per_item']:.1f} / {r['median_wall_s_per_item']:.1f} |")
    controls = {kind: s["control"] for kind, s in summary.items() if isinstance(s, dict) and "control" in s}
    if controls:
        lines += ["", "The fair control: the same model given each whole query, closed-book and with the same index's "
                  "passages for the whole question (`system=monolithic` / `monolithic_retrieval`), on the same items:",
                  "", "| data set | n | monolithic closed-book | monolithic + retrieval | retrieval gain, monolithic | "
                  "retrieval gain, compiled | compiled minus monolithic, with retrieval | ... closed-book |",
                  "|---|---|---|---|---|---|---|---|"]

        def pts(d: dict) -> str:
            return f"{d['points']:+.1f} [{d['ci95'][0]:+.1f}, {d['ci95'][1]:+.1f}]"

        for kind, c in controls.items():
            mc, mr = c["monolithic"], c["monolithic_retrieval"]
            lines.append(f"| {kind} | {c['n']} | {mc['mean']:.3f} [{mc['ci95'][0]:.3f}, {mc['ci95'][1]:.3f}] | "
                         f"{mr['mean']:.3f} [{mr['ci95'][0]:.3f}, {mr['ci95'][1]:.3f}] | {pts(c['monolithic_gain_points'])}"
                         f" | {pts(c['compiled_gain_points'])} | {pts(c['compiled_vs_monolithic_with_retrieval_points'])}"
                         f" | {pts(c['compiled_vs_monolithic_closed_book_points'])} |")
        if "unparsed" in controls.get("strategyqa", {}):
            u = controls["strategyqa"]["unparsed"]
            lines.append(f"\nStrategyQA answers with no yes/no, monolithic: closed-book {u['monolithic']}, with retrieval "
                         f"{u['monolithic_retrieval']} of {controls['strategyqa']['n']}.")
    bias = summary.get("strategyqa", {}).get("control", {}).get("answer_bias")
    if bias:
        lines += ["", "StrategyQA answer bias (the same items): a system's accuracy moves with how often it says yes; "
                  f"balanced accuracy does not (0.5 = chance; gold says yes on {next(iter(bias.values()))['gold_yes_rate']:.1%}):",
                  "", "| system | says yes | accuracy on yes-questions / no-questions | balanced accuracy [95% CI] |",
                  "|---|---|---|---|"]
        for name, b in bias.items():
            lines.append(f"| {name} | {b['yes_rate']:.1%} | {b['tpr']:.3f} / {b['tnr']:.3f} | "
                         f"{b['balanced_accuracy']:.3f} [{b['balanced_ci95'][0]:.3f}, {b['balanced_ci95'][1]:.3f}] |")
    sq = summary.get("strategyqa")
    if sq:
        lines.append(f"\nStrategyQA final answers with no yes/no in them (scored wrong): closed-book "
                     f"{sq['closed_book']['unparsed']}, with retrieval {sq['retrieval']['unparsed']} of {sq['n']}.")
    lines += ["", "Retrieval stage table (the retrieval system's items; a FanOutQA item counts as correct at loose "
              "accuracy >= 0.5):", "", "| data set | hit rates | retrieval miss | miss, correct | hit, answer wrong | "
              "hit, correct | lookups per item |", "|---|---|---|---|---|---|---|"]
    for kind, s in summary.items():
        if kind not in ("fanoutqa", "strategyqa"):
            continue
        rates = ", ".join(f"{k} {v:.2f}" for k, v in s["hit_rates"].items())
        st = s["stages"]
        lines.append(f"| {kind} | {rates} | {st['retrieval miss']} | {st['miss, correct']} | {st['hit, answer wrong']} "
                     f"| {st['hit, correct']} | {s['lookups_per_item']:.1f} |")
    if comparison:
        hay = comparison["haystack"]
        lines += ["", f"Index comparison on the whole questions, top-{comparison['k']} (n = {comparison['items']}), over "
                  f"a haystack of {hay['passages']} passages: the {hay['relevant_by_gold']} that count as a hit for some "
                  f"item by the gold alone plus {hay['random_distractors']} random ones (see `compare_indexes`):",
                  "", "| index | data set | n | hit rate | detail |", "|---|---|---|---|---|"]
        for name in ("bm25", "minilm"):
            for kind, s in comparison[name].items():
                detail = ", ".join(f"{k} {v:.2f}" for k, v in s.items() if k not in ("n", "hit_rate"))
                lines.append(f"| {name} | {kind} | {s['n']} | {s['hit_rate']:.2f} | {detail} |")
        secs = comparison["seconds"]
        lines.append(f"\nSeconds (shared CPU): BM25 build + all lookups {secs['bm25_build_and_search']:.1f}; MiniLM "
                     f"embedding the haystack + all lookups {secs['minilm_embed_and_search']:.0f}.")
    return "\n".join(lines) + "\n"


def interleave(first: list, second: list) -> list:
    """Alternate the two data sets' items while both last, then the longer one's rest: a run stopped early has
    grown both."""
    out = [x for pair in zip(first, second) for x in pair]
    return out + first[len(second):] + second[len(first):]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=50, help="items per data set")
    ap.add_argument("--n-fanoutqa", type=int, help="FanOutQA items (default --n; 239 is all of dev with <= 6 gold "
                    "sub-questions)")
    ap.add_argument("--n-strategyqa", type=int, help="StrategyQA items (default --n)")
    ap.add_argument("--fanoutqa-all", action="store_true", help="FanOutQA: every dev question (any number of gold "
                    "sub-questions) less the planner's exemplars (conf/decomposer/fanoutqa.yaml), 307 items")
    ap.add_argument("--chunk", type=int, default=8)
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-llamacpp")
    ap.add_argument("--out", default=str(RESULTS / "bench_retrieval.json"))
    ap.add_argument("--compare-index-only", action="store_true")
    ap.add_argument("--no-compare", action="store_true")
    ap.add_argument("--summarize-only", action="store_true", help="tables from the items already answered")
    ap.add_argument("--redo", choices=["fanoutqa", "strategyqa"], action="append", default=[],
                    help="answer this data set's items again with both compiled systems (after a change to them); "
                    "the monolithic control's answers are kept")
    ap.add_argument("--no-monolithic", action="store_true", help="skip the fair control (monolithic, closed-book and "
                    "with the same retrieval)")
    ap.add_argument("--comparison-from", help="take index_comparison from this results file (a --compare-index-only "
                    "run with another --out, run beside the model runs)")
    args = ap.parse_args()
    if args.fanoutqa_all:  # the "all of FanOutQA dev minus the exemplars"
        exemplars = list(compose(["decomposer=fanoutqa"]).decomposer.fanoutqa_exemplars)
        fanout = fanoutqa_items(10**6, max_gold_subquestions=10**6, exclude=exemplars)
    else:
        fanout = fanoutqa_items(args.n if args.n_fanoutqa is None else args.n_fanoutqa)
    items = interleave(fanout, strategyqa_items(args.n if args.n_strategyqa is None else args.n_strategyqa))
    evidence = evidence_titles()
    from compllm.knowledge import load_corpus

    titles = {p.title for p in load_corpus("wiki").passages}
    out_path = Path(args.out)
    state = json.loads(out_path.read_text()) if out_path.is_file() else {}
    if state.get("model") not in (None, args.model):
        state = {}
    rows: dict[str, dict] = state.get("items", {})
    for row in rows.values():
        if row["item"]["kind"] in args.redo:
            for name in (*SYSTEMS, "split_s"):
                row.pop(name, None)
    meta = {"command": "PYTHONPATH=$PWD .venv/bin/python experiments/bench_retrieval.py " + shlex.join(sys.argv[1:]),
            "model": args.model, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared)",
            "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if args.summarize_only and state.get("meta"):
        meta = {**state["meta"], "summarized_by": meta["command"]}
    cfg = compose([f"model={args.model}", "experts=retrieval", "show_progress=false"])
    comparison = state.get("index_comparison")
    if args.comparison_from:
        comparison = json.loads(Path(args.comparison_from).read_text())["index_comparison"]
    if (not args.no_compare and comparison is None and not args.summarize_only) or args.compare_index_only:
        comparison = compare_indexes(items, evidence, titles, cfg.router)
    if not args.compare_index_only and not args.summarize_only:
        from compllm.apps.build import build_pipeline

        rag = build_pipeline(cfg)
        rag.prepare()
        closed = copy.copy(rag)  # same pool, router, cost model: only the experts' knowledge differs
        closed.experts = {n: replace(e, knowledge=None) for n, e in rag.experts.items()}
        closed.retrievers = {}
        # Per chunk, the compiled systems then the control answer the same items, so a run stopped anywhere leaves
        # every finished item complete (the comparisons are paired).
        systems = SYSTEMS if args.no_monolithic else SYSTEMS + MONOLITHIC
        todo = [it for it in items if not all(name in rows.get(it.id, {}) for name in systems)]
        controls = monolithic_systems() if todo and not args.no_monolithic else {}
        for start in range(0, len(todo), args.chunk):
            chunk = todo[start:start + args.chunk]
            t0 = time.perf_counter()
            compiled = [it for it in chunk if not all(name in rows.get(it.id, {}) for name in SYSTEMS)]
            if compiled:
                for item_id, answered in run_chunk(rag, closed, compiled).items():
                    rows.setdefault(item_id, {}).update(answered)  # a control already answered stays
            t1 = time.perf_counter()
            control = [it for it in chunk if not all(name in rows[it.id] for name in MONOLITHIC)]
            if controls and control:
                for item_id, answered in run_monolithic_chunk(rag, controls, control).items():
                    rows[item_id].update(answered)
            done = sum(all(name in rows.get(it.id, {}) for name in systems) for it in items)
            print(f"{done}/{len(items)} items (compiled {t1 - t0:.0f}s, control {time.perf_counter() - t1:.0f}s for "
                  f"{len(chunk)})", flush=True)
            state = {"model": args.model, "items": rows, "index_comparison": comparison, "meta": meta}
            out_path.write_text(json.dumps(state, indent=1, ensure_ascii=False))
    summary = summarize(rows, items, evidence, titles)
    summary["retrieval_gain_fanoutqa_points"] = summary.get("fanoutqa", {}).get("gain_points")
    summary["retrieval_gain_strategyqa_points"] = summary.get("strategyqa", {}).get("gain_points")
    state = {"model": args.model, "summary": summary, "index_comparison": comparison, "meta": meta, "items": rows}
    out_path.write_text(json.dumps(state, indent=1, ensure_ascii=False))
    out_path.with_suffix(".md").write_text(table(summary, comparison, meta), encoding="utf-8")
    print(table(summary, comparison, meta))


if __name__ == "__main__":
    main()
