"""Faithfulness of final answers: `aggregator.mode=join` vs `aggregator.mode=model`, same model, same splits.

    PYTHONPATH=$PWD .venv/bin/python experiments/bench_answers.py [--model qwen2.5-coder-0.5b] [--limit N]

Set: experiments/data/compound_questions.jsonl (everyday compound questions with gold answers per part; see
compllm/data/faithfulness.py for the format and every metric). Each question is run through the composed
pipeline (in-process, `build_pipeline` on the Hydra config, default config plus `model=`) once with
`mode=join`, which also decomposes it; then with `mode=model` on that same decomposition (`Pipeline.run(...,
decompositions=)`), so both modes answer the same sub-queries with the same experts and only the final answer
is made differently. (Numbered questions are joined in both modes: `Pipeline.final_answer`.)

Reported per mode: the share of the parts the final answer must carry (the leaves) whose expert answer reaches it
unchanged (verbatim; for `model` also its key fact), the share of final-answer sentences no sub-answer supports,
the part accuracy of final answers vs of expert answers (gold containment), model calls and median seconds
per query (the planner's call and seconds counted in both modes: `model` reuses `join`'s split).

Writes experiments/results/bench_answers.json after every question and mode (resumable: a rerun skips what is
done; `model` answers are redone when the aggregator prompt changed), and bench_answers.md (the table).
`--replay` makes the `model` answers with the aggregator call alone over the stored `join` expert answers (for
iterating on the prompt: copy a results file, `--replay --out` the copy; the table's seconds then count only
the aggregator call).
`--limit N` takes N questions round-robin over the kinds, so a short run sees every kind.
"""
from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "experiments" / "results"
DATA = ROOT / "experiments" / "data" / "compound_questions.jsonl"
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from compllm.data.faithfulness import (KINDS, SUPPORT_THRESHOLD, CompoundQuestion, aggregate,  # noqa: E402
                                       load_questions, score_query, sub_answers)

MODES = ("join", "model")
THRESHOLDS = (0.5, 2 / 3, 1.0)  # sensitivity of the unsupported share to the support threshold


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from compllm.config.schema import register

    register()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose("config", overrides=overrides)


def pick(questions: list[CompoundQuestion], limit: int | None) -> list[CompoundQuestion]:
    """The first `limit` questions taken round-robin over the kinds (all of them without a limit)."""
    if limit is None or limit >= len(questions):
        return questions
    queues = {k: [q for q in questions if q.kind == k] for k in KINDS}
    out: list[CompoundQuestion] = []
    while len(out) < limit:
        for k in KINDS:
            if queues[k] and len(out) < limit:
                out.append(queues[k].pop(0))
    return out


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def aggregator_fingerprint(aggregator) -> str:
    """What the `model` answers depend on beyond the header: the prompt code and the aggregator's settings."""
    from compllm.runtime.prompts import Aggregator
    return sha(inspect.getsource(Aggregator.request) + repr(aggregator))


# ----------------------------------------------------------------------------------------- running

def decomposition_to_dict(d) -> dict[str, Any]:
    return {"query": d.query, "fallback": d.fallback, "reason": d.reason, "warnings": list(d.warnings),
            "format": d.format, "omitted": d.omitted, "raw_output": d.raw_output,
            "subqueries": [{"index": s.index, "text": s.text, "depends_on": list(s.depends_on),
                            "answer_type": s.answer_type} for s in d.subqueries]}


def decomposition_from_dict(rec: dict[str, Any]):
    from compllm.frontend.decomposer import Decomposition
    from compllm.frontend.parse import SubQuery
    subs = tuple(SubQuery(s["index"], s["text"], tuple(s["depends_on"]), s["answer_type"]) for s in rec["subqueries"])
    return Decomposition(rec["query"], subs, rec["fallback"], rec["reason"], tuple(rec["warnings"]),
                         rec["raw_output"], rec["format"], omitted=rec["omitted"])


def run_one(pipeline, aggregator, question: CompoundQuestion, decomposition=None) -> dict[str, Any]:
    """One question through the whole pipe with `aggregator`; what the scorer and the table need."""
    pipeline.aggregator = aggregator
    start = time.perf_counter()
    result, _ = pipeline.run([question.query], decompositions=[decomposition] if decomposition else None)
    wall = time.perf_counter() - start
    q = result.queries[0]
    d = pipeline_decomposition(result, decomposition)
    planner_calls = 0 if decomposition is not None or d["format"] == "enumerated" else 1
    return {
        "planner_calls": planner_calls,
        "final_answer": q.final_answer,
        "partial": q.partial, "unanswered": q.unanswered,
        "decomposition": d,
        "sub_answers": [{"index": s.index, "question": s.question, "answer": s.answer, "ok": s.ok,
                         "depends_on": list(s.depends_on)} for s in sub_answers(q)],
        "experts": [n.expert for n in q.nodes if n.kind == "subquery"],
        "aggregate": next(({"model": n.model, "prompt": n.prompt, "answer": n.answer, "status": n.status}
                           for n in q.nodes if n.kind == "aggregate"), None),
        "model_calls": planner_calls + sum(n.attempts for n in q.nodes if n.model),
        "seconds": wall, "timings": dict(result.timings),
    }


def replay_one(pipeline, aggregator, question: CompoundQuestion, join_run: dict[str, Any]) -> dict[str, Any]:
    """`--replay`: the `model` final answer made by the aggregator call alone, over the expert answers stored by
    the `join` run (the prompt is built by the runtime's own `ExecutionContext.request` on the same graph)."""
    from compiler.build import node_id
    from compllm.runtime.result import NodeResult

    pipeline.aggregator = aggregator
    d = decomposition_from_dict(join_run["decomposition"])
    graph = pipeline.build([d], pipeline.route([d]))
    sink = graph.nodes[graph.queries["q0"].sink]
    run = {k: join_run[k] for k in ("partial", "unanswered", "decomposition", "sub_answers", "experts")}
    run.update(planner_calls=0, replayed=True, timings={})
    if sink.host is not None:  # joined in this mode too (numbered questions, one part)
        return {**run, "final_answer": join_run["final_answer"], "aggregate": join_run["aggregate"],
                "model_calls": 0, "seconds": 0.0}
    results = {}
    for s in join_run["sub_answers"]:
        nid = node_id("q0", s["index"])
        results[nid] = NodeResult(nid, "q0", "subquery", "", "", answer=s["answer"],
                                  status="ok" if s["ok"] else "failed",
                                  error="" if s["ok"] else "failed in the join run")
    request = pipeline.context().request(graph, sink, results)
    pipeline.pool.get(aggregator.model)
    start = time.perf_counter()
    gen = pipeline.pool.resident(aggregator.model).generate([request])[0]
    final = gen.text + (f"\n(Not answered: {d.omitted}.)" if d.omitted else "")
    prompt = request.messages[-1]["content"]
    return {**run, "final_answer": final, "model_calls": 1, "seconds": time.perf_counter() - start,
            "aggregate": {"model": aggregator.model, "prompt": prompt, "answer": gen.text, "status": "ok"}}


def pipeline_decomposition(result, given) -> dict[str, Any]:
    if given is not None:
        return decomposition_to_dict(given)
    dec = result.queries[0].decomposition
    return {"query": result.queries[0].query, "fallback": dec["fallback"], "reason": dec["reason"],
            "warnings": dec["warnings"], "format": dec["format"], "raw_output": dec["raw_output"],
            "omitted": next((u for u in result.queries[0].unanswered if not u.startswith("part ")), ""),
            "subqueries": [{"index": s["index"], "text": s["text"], "depends_on": list(s["depends_on"]),
                            "answer_type": s["answer_type"]} for s in dec["subqueries"]]}


def score(question: CompoundQuestion, mode: str, run: dict[str, Any]) -> dict[str, Any]:
    from compllm.data.faithfulness import SubAnswer, unsupported_sentences
    subs = [SubAnswer(s["index"], s["question"], s["answer"], tuple(s["depends_on"]), s["ok"])
            for s in run["sub_answers"]]
    scored = score_query(question.id, mode, run["final_answer"], question.query, subs, question,
                         run["decomposition"]["omitted"])
    out = scored.to_dict()
    out["unsupported_at"] = {
        f"{t:.2f}": unsupported_sentences(run["final_answer"], question.query, subs, t)["unsupported"]
        for t in THRESHOLDS}
    return out


# ----------------------------------------------------------------------------------------- the file

def load(path: Path, header: dict[str, Any]) -> dict[str, Any]:
    if not path.exists():
        return {"header": header, "items": {}}
    record = json.loads(path.read_text(encoding="utf-8"))
    if record.get("header") != header:
        changed = sorted(k for k in {**record.get("header", {}), **header} if record["header"].get(k) != header.get(k))
        sys.exit(f"{path} holds results of another configuration (differs in: {', '.join(changed)}); "
                 "pass another --out, or delete it to start over")
    return record


def save(path: Path, record: dict[str, Any]) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=1, ensure_ascii=False), encoding="utf-8")
    tmp.replace(path)


# ----------------------------------------------------------------------------------------- the table

def summarize(record: dict[str, Any], questions: list[CompoundQuestion]) -> dict[str, Any]:
    """Per mode: the summed counts and shares, model calls and median seconds per query, by kind; and how many
    questions got the same expert answers in both modes. `model` reuses `join`'s split, so the planner's call
    and seconds (from the `join` run) are added to its own."""
    items = {q.id: (q, record["items"][q.id]) for q in questions if q.id in record["items"]}
    summary: dict[str, Any] = {}
    for mode in MODES:
        done = [(q, item[mode], item["join"]) for q, item in items.values() if mode in item]
        if not done:
            continue
        total = aggregate(r["score"]["counts"] for _, r, _ in done)
        borrowed = [(j["planner_calls"], j["timings"].get("decompose", 0.0)) if mode == "model" else (0, 0.0)
                    for _, _, j in done]
        total["model_calls"] = sum(r["model_calls"] + b[0] for (_, r, _), b in zip(done, borrowed))
        total["median_s"] = statistics.median(r["seconds"] + b[1] for (_, r, _), b in zip(done, borrowed))
        loads = [r["load_avg"] for _, r, _ in done if "load_avg" in r]
        total["median_load_avg"] = statistics.median(loads) if loads else None
        total["unsupported_at"] = {t: sum(r["score"]["unsupported_at"][t] for _, r, _ in done)
                                   for t in done[0][1]["score"]["unsupported_at"]}
        by_kind = {k: aggregate(r["score"]["counts"] for q, r, _ in done if q.kind == k) for k in KINDS}
        total["by_kind"] = {k: v for k, v in by_kind.items() if v["queries"]}
        summary[mode] = total
    both = [item for _, item in items.values() if all(m in item for m in MODES)]
    summary["compared"] = len(both)
    summary["same_sub_answers"] = sum([s["answer"] for s in item["join"]["sub_answers"]]
                                      == [s["answer"] for s in item["model"]["sub_answers"]] for item in both)
    return summary


def pct(x: float | None) -> str:
    return "–" if x is None else f"{x:.0%}"


def table(record: dict[str, Any], questions: list[CompoundQuestion], summary: dict[str, Any]) -> str:
    h = record["header"]
    done = [q for q in questions if q.id in record["items"]]
    lines = [
        f"# Final answers: join vs model (`{h['model']}`)", "",
        f"{len(done)} compound questions from `{h['data']}` ({sum(len(q.parts) for q in done)} gold parts); "
        f"model `{h['model']}` "
        f"for planner, experts and aggregator; same decomposition for both modes. Made by (a resumed run lists "
        f"every command that wrote into its file, in order):", "",
        *(f"    {c}" for c in record["commands"]), "",
        "| mode | parts reaching the final answer unchanged | verbatim | unsupported sentences | "
        "sentences saying nothing | final-answer part accuracy | expert part accuracy | model calls | "
        "median s / query |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for mode in MODES:
        s = summary.get(mode)
        if not s:
            continue
        lines.append(
            f"| {mode} | {pct(s['share_reached'])} ({s['reached']}/{s['must_carry']}) | "
            f"{pct(s['share_verbatim'])} ({s['verbatim']}/{s['must_carry']}) | "
            f"{pct(s['share_unsupported'])} ({s['unsupported']}/{s['sentences']}) | "
            f"{pct(s['empty'] / s['sentences'] if s['sentences'] else None)} ({s['empty']}/{s['sentences']}) | "
            f"{pct(s['final_accuracy'])} ({s['final_correct']}/{s['gold_parts']}) | "
            f"{pct(s['expert_accuracy'])} ({s['expert_correct']}/{s['gold_parts']}) | "
            f"{s['model_calls']} | {s['median_s']:.1f} |")
    lines += ["", "Definitions: `compllm/data/faithfulness.py`. *Unchanged*: for `join` the expert's answer verbatim "
              "(case and whitespace aside); for `model` verbatim or its key fact (every content word of its first "
              "sentence not in its sub-question, in one sentence of the final answer). Parts counted: the leaves "
              "(parts nothing else reads). *Unsupported*: under half of a sentence's content words (question words "
              "removed) occur in the sub-answers. *Saying nothing*: no content word beyond stopwords, framing words "
              "(answer, question, part) and the question's own words: filler, or the question repeated. "
              "*Part accuracy*: a gold answer in the final answer / in some "
              "expert answer, over every gold part (chain steps included)."]
    extra = []
    for mode in MODES:
        s = summary.get(mode)
        if not s:
            continue
        at = ", ".join(f"{float(t):.2f}: {n}" for t, n in s["unsupported_at"].items())
        extra.append(f"* `{mode}`: unsupported sentences by threshold ({at}) of {s['sentences']}; "
                     f"leaf-part accuracy final {pct(s['final_accuracy_leaves'])} vs expert "
                     f"{pct(s['expert_accuracy_leaves'])}; parts missing and said so: "
                     f"{s['missing_stated']}/{s['missing']} queries")
        for kind, k in s["by_kind"].items():
            extra.append(f"  * {kind} ({k['queries']}): reached {pct(k['share_reached'])}, unsupported "
                         f"{pct(k['share_unsupported'])}, final accuracy {pct(k['final_accuracy'])} "
                         f"(expert {pct(k['expert_accuracy'])})")
    loads = {m: summary[m]["median_load_avg"] for m in MODES if m in summary}
    extra.append(f"* seconds are wall time on this machine ({record['machine']['cpus']} CPUs), shared: median 1-min "
                 "load average when a question started: " + ", ".join(
                     f"{m} {'not recorded' if v is None else f'{v:.1f}'}" for m, v in loads.items())
                 + "; `model` adds the planner seconds of its `join` run")
    if summary.get("compared"):
        extra.append(f"* same expert answers in both modes: {summary['same_sub_answers']}/{summary['compared']} "
                     "questions")
    return "\n".join(lines + [""] + extra) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--limit", type=int, default=None, help="N questions, round-robin over the kinds")
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--override", nargs="*", default=[], help="extra Hydra overrides")
    ap.add_argument("--out", default=str(RESULTS / "bench_answers"))
    ap.add_argument("--replay", action="store_true",
                    help="mode=model by the aggregator call alone over the join run's expert answers (prompt "
                         "iteration: one call per question; its seconds count only that call)")
    args = ap.parse_args()
    command = " ".join(["PYTHONPATH=$PWD .venv/bin/python experiments/bench_answers.py",
                        *(shlex.quote(a) for a in sys.argv[1:])])

    questions = pick(load_questions(args.data), args.limit)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    data = Path(args.data).resolve()
    header = {"model": args.model, "overrides": args.override,
              "data": str(data.relative_to(ROOT)) if data.is_relative_to(ROOT) else str(data),
              "data_sha": sha(data.read_text(encoding="utf-8"))}
    record = load(out.with_suffix(".json"), header)

    from hydra.utils import instantiate

    from compllm.apps.build import build_pipeline

    cfg = compose([f"model={args.model}", "aggregator.mode=join", *args.override])
    pipeline = build_pipeline(cfg)
    aggregators = {m: instantiate(compose([f"model={args.model}", f"aggregator.mode={m}", *args.override]).aggregator,
                                  _convert_="all") for m in MODES}
    fingerprint = aggregator_fingerprint(aggregators["model"])
    pipeline.prepare()  # fit the router and build the cost model outside any question's seconds
    record["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}
    for n, q in enumerate(questions, 1):
        item = record["items"].setdefault(q.id, {})
        if "model" in item and (item["model"].get("aggregator"), item["model"].get("replayed", False)) != (
                fingerprint, args.replay):
            print(f"{q.id}: the aggregator prompt or --replay changed; redoing mode=model", file=sys.stderr)
            del item["model"]
        for mode in args.modes:
            if mode in item:
                continue
            if mode == "model" and "join" not in item:
                continue  # model reuses join's decomposition
            given = decomposition_from_dict(item["join"]["decomposition"]) if mode == "model" else None
            load_avg = os.getloadavg()[0]  # seconds are wall time on a machine others may share
            if mode == "model" and args.replay:
                run = replay_one(pipeline, aggregators[mode], q, item["join"])
            else:
                run = run_one(pipeline, aggregators[mode], q, given)
            run["load_avg"] = load_avg
            if mode == "model":
                run["aggregator"] = fingerprint
            run["score"] = score(q, mode, run)
            item[mode] = run
            c = run["score"]["counts"]
            print(f"[{n}/{len(questions)}] {q.id} {mode}: reached {c['reached']}/{c['must_carry']}, unsupported "
                  f"{c['unsupported']}/{c['sentences']}, correct {c['final_correct']}/{c['gold_parts']} "
                  f"({run['seconds']:.0f}s)", flush=True)
            save(out.with_suffix(".json"), record)
    for q in questions:  # scores are recomputed from the stored answers: a metric change never leaves stale ones
        for mode, run in record["items"].get(q.id, {}).items():
            run["score"] = score(q, mode, run)
    summary = summarize(record, questions)
    record["summary"] = summary
    if record.get("commands", [None])[-1] != command:
        record.setdefault("commands", []).append(command)  # a resumed file: every command that wrote into it
    text = table(record, questions, summary)
    save(out.with_suffix(".json"), record)
    out.with_suffix(".md").write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
