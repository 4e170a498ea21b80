"""meqa_p: multi-expert compound questions built from MMLU, k questions from k distinct domains per item.

Construction (fixed seed, so every system sees the same items): for item i, draw k uniformly from
[k_min, k_max], draw k distinct domains (law, medicine, economics, science_math), draw one unused MMLU
question from each, and join them as numbered questions under one request, ending with the answer format
every system is asked to follow ("Question N: <letter>", one line each). Gold is the letter per part.
"""
from __future__ import annotations

import random
from typing import Sequence

from compllm.bench.items import BenchItem
from compllm.data.mmlu import by_domain

ANSWER_FORMAT = "Reply with one line per question in the form 'Question N: <letter>'."


def compound_query(prompts: Sequence[str]) -> str:
    """Numbered questions under one request: how a person pastes several exam questions into one message."""
    body = " ".join(f"Question {i}: {p}" for i, p in enumerate(prompts, 1))
    return f"Please answer these {len(prompts)} questions. {body} {ANSWER_FORMAT}"


def meqa_p(n: int, k_min: int = 2, k_max: int = 4, seed: int = 0, max_question_chars: int = 600) -> list[BenchItem]:
    if not 1 <= k_min <= k_max:
        raise ValueError(f"meqa_p needs 1 <= k_min <= k_max, got k_min={k_min}, k_max={k_max}")
    rng = random.Random(seed)
    pools = by_domain(max_question_chars)
    domains = sorted(pools)
    if k_max > len(domains):
        raise ValueError(f"meqa_p: k_max={k_max} exceeds the {len(domains)} distinct domains ({', '.join(domains)})")
    for questions in pools.values():
        rng.shuffle(questions)
    cursor = {d: 0 for d in domains}
    items = []
    for i in range(n):
        picked = rng.sample(domains, rng.randint(k_min, k_max))
        parts = []
        for domain in picked:
            if cursor[domain] >= len(pools[domain]):
                raise ValueError(f"meqa_p: domain {domain!r} has only {len(pools[domain])} questions; lower n")
            q = pools[domain][cursor[domain]]
            cursor[domain] += 1
            parts.append({"domain": domain, "topic": q.topic, "question": q.prompt(), "answer": q.answer})
        query = compound_query([p["question"] for p in parts])
        items.append(BenchItem(f"meqa_p-{i:04d}", "meqa", query, {"letters": [p["answer"] for p in parts]},
                               tuple(parts)))
    return items


def fanoutqa_item_id(fanoutqa_id: str) -> str:
    """The benchmark item id of a FanOutQA dev question."""
    return f"fanoutqa-{fanoutqa_id}"


def fanoutqa_items(n: int, max_gold_subquestions: int = 6, exclude: Sequence[str] = ()) -> list[BenchItem]:
    """FanOutQA dev questions, closed-book, in file order, less `exclude` (FanOutQA ids: the planner's exemplars);
    only those whose gold DAG has at most `max_gold_subquestions` top-level sub-questions (the decomposer emits at
    most `max_subqueries`)."""
    from compllm.data.fanoutqa import load_fanoutqa_dev, without

    out = []
    for item in without(load_fanoutqa_dev(), exclude):
        if len(item.decomposition) > max_gold_subquestions:
            continue
        parts = tuple({"id": s.id, "question": s.question, "answer_strings": list(s.answer_strings),
                       "depends_on": list(s.depends_on)} for s in item.decomposition)
        out.append(BenchItem(fanoutqa_item_id(item.id), "fanoutqa", item.question,
                             {"answer_strings": list(item.answer_strings)}, parts))
        if len(out) == n:
            break
    return out


def strategyqa_items(n: int, seed: int = 0) -> list[BenchItem]:
    """StrategyQA yes/no questions (implicit multi-hop), a fixed-seed sample."""
    from compllm.data.strategyqa import load_strategyqa

    pool = list(load_strategyqa())
    random.Random(seed).shuffle(pool)
    return [BenchItem(q.id, "strategyqa", f"{q.question} Answer yes or no.", {"answer": q.answer},
                      tuple({"fact": f} for f in q.facts)) for q in pool[:n]]


def meqa_all(n_meqa_p: int = 100, n_fanoutqa: int = 100, n_strategyqa: int = 100, seed: int = 0,
             max_gold_subquestions: int = 6) -> list[BenchItem]:
    """meqa_p plus questions with dependencies (FanOutQA, StrategyQA), interleaved so that any prefix
    (`task.limit`) holds all three kinds in equal shares."""
    kinds = [meqa_p(n_meqa_p, seed=seed), fanoutqa_items(n_fanoutqa, max_gold_subquestions),
             strategyqa_items(n_strategyqa, seed)]
    out = []
    for i in range(max(map(len, kinds))):
        out += [k[i] for k in kinds if i < len(k)]
    return out
