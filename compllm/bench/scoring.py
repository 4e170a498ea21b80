"""Score stored answers. Results files keep raw text, so a better parser re-scores old runs without rerunning
models: `experiments/report.py` always scores from the JSONL, never from numbers cached at run time."""
from __future__ import annotations

import math
import random
import statistics
from typing import Any, Callable, Iterable, Sequence

from compllm.data.textmetrics import answer_containment, parse_choice_letters, parse_yes_no, token_f1


def score_meqa(record: dict[str, Any]) -> dict[str, Any]:
    gold = record["gold"]["letters"]
    k = len(gold)
    predicted = parse_choice_letters(record["answer"]["final_answer"], k)
    correct = [p == g for p, g in zip(predicted, gold)]
    out: dict[str, Any] = {"parts": k, "part_correct": correct, "part_accuracy": sum(correct) / k,
                           "all_correct": all(correct), "unparsed_parts": sum(p is None for p in predicted)}
    out.update(_meqa_stages(record, predicted))
    return out


def _meqa_stages(record: dict[str, Any], final_letters: Sequence[str | None]) -> dict[str, Any]:
    """Where a composed system lost each part: split, routing, expert answer, or aggregation."""
    subs = record["answer"].get("subqueries") or []
    parts, gold = record["parts"], record["gold"]["letters"]
    if not subs:
        return {}
    if len(subs) != len(parts):
        return {"stage": ["split"] * len(parts)}
    stages = []
    for sub, part, g, final in zip(subs, parts, gold, final_letters):
        expert_letter = parse_choice_letters(sub.get("answer", ""), 1)[0]
        if final == g:
            stages.append("correct")
        elif expert_letter != g:
            stages.append("expert_wrong_misrouted" if sub.get("expert") != part["domain"] else "expert_wrong")
        else:
            stages.append("aggregation")
    return {"stage": stages, "routed_to_domain": [s.get("expert") == p["domain"] for s, p in zip(subs, parts)],
            "expert_correct": [parse_choice_letters(s.get("answer", ""), 1)[0] == g for s, g in zip(subs, gold)]}


def score_strategyqa(record: dict[str, Any]) -> dict[str, Any]:
    said = parse_yes_no(record["answer"]["final_answer"])
    return {"correct": said == record["gold"]["answer"], "unparsed": said is None}


def score_fanoutqa(record: dict[str, Any]) -> dict[str, Any]:
    gold = record["gold"]["answer_strings"]
    final = record["answer"]["final_answer"]
    out: dict[str, Any] = {"containment": answer_containment(final, gold), "f1": token_f1(final, gold)}
    subs = record["answer"].get("subqueries")
    if subs:
        from compllm.data.decomposition import decomposition_quality

        from compllm.data.fanoutqa import GoldSubQuestion

        gold_dag = [GoldSubQuestion(**p) for p in record["parts"]]
        out["decomposition"] = decomposition_quality([(s["text"], s["depends_on"]) for s in subs], gold_dag)
    return out


SCORERS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "meqa": score_meqa, "strategyqa": score_strategyqa, "fanoutqa": score_fanoutqa}


def score(record: dict[str, Any]) -> dict[str, Any]:
    return SCORERS[record["kind"]](record)


def bootstrap_ci(values: Sequence[float], level: float = 0.95, resamples: int = 2000, seed: int = 0,
                 weights: Sequence[float] | None = None) -> tuple[float, float]:
    """Percentile bootstrap over items (parts of one item are correlated, so items are the unit). With
    `weights`, the statistic is the ratio sum(values) / sum(weights) (e.g. correct parts / parts)."""
    if not values:
        return (math.nan, math.nan)
    rng = random.Random(seed)
    pairs = list(zip(values, weights if weights is not None else [1.0] * len(values)))

    def stat(sample: list[tuple[float, float]]) -> float:
        return sum(v for v, _ in sample) / sum(w for _, w in sample)

    means = sorted(stat(rng.choices(pairs, k=len(pairs))) for _ in range(resamples))
    lo = means[int((1 - level) / 2 * resamples)]
    hi = means[min(resamples - 1, int((1 + level) / 2 * resamples))]
    return lo, hi


def summarize(records: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Per benchmark kind: n, the headline metrics with 95% CIs, latency; for meqa the per-stage error counts."""
    by_kind: dict[str, list[tuple[dict, dict]]] = {}
    for r in records:
        by_kind.setdefault(r["kind"], []).append((r, score(r)))
    out: dict[str, Any] = {}
    for kind, pairs in by_kind.items():
        latencies = [r["answer"]["latency_s"] for r, _ in pairs]
        s: dict[str, Any] = {"n": len(pairs), "median_latency_s": statistics.median(latencies),
                             "partial": sum(r["answer"]["partial"] for r, _ in pairs)}
        metrics = {"meqa": ("all_correct",), "strategyqa": ("correct",),
                   "fanoutqa": ("containment", "f1")}[kind]
        for m in metrics:
            values = [float(sc[m]) for _, sc in pairs]
            s[m] = statistics.fmean(values)
            s[f"{m}_ci95"] = bootstrap_ci(values)
        if kind == "meqa":  # per-part accuracy over all parts (an item of 4 parts weighs twice one of 2)
            correct, parts = [float(sum(sc["part_correct"])) for _, sc in pairs], [sc["parts"] for _, sc in pairs]
            s["part_accuracy"] = sum(correct) / sum(parts)
            s["part_accuracy_ci95"] = bootstrap_ci(correct, weights=parts)
            stages: dict[str, int] = {}
            for _, sc in pairs:
                for st in sc.get("stage", []):
                    stages[st] = stages.get(st, 0) + 1
            s["stages"] = stages
            routed = [ok for _, sc in pairs for ok in sc.get("routed_to_domain", [])]
            experts = [ok for _, sc in pairs for ok in sc.get("expert_correct", [])]
            s["routed_to_domain"] = statistics.fmean(routed) if routed else None  # share of parts, when split
            s["expert_accuracy"] = statistics.fmean(experts) if experts else None  # before aggregation
            s["parts"] = sum(sc["parts"] for _, sc in pairs)
            s["unparsed_parts"] = sum(sc["unparsed_parts"] for _, sc in pairs)
        if kind == "fanoutqa":
            dq = [sc["decomposition"] for _, sc in pairs if "decomposition" in sc]
            if dq:
                s["decomposition"] = {k: statistics.fmean(float(d[k]) for d in dq)
                                      for k in dq[0] if isinstance(dq[0][k], (int, float))}
        out[kind] = s
    return out
