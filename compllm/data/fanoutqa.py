"""FanOutQA dev (310 multi-hop "fan-out" questions with human-written gold decompositions) from `fanoutqa`.

The package is installed with --no-deps and never imported (its eval code needs spaCy, BLEURT and an OpenAI
key); `fanoutqa/data/fanout-final-dev.json` is read directly. Facts about the file (fanoutqa 1.1.1):
- top-level answers: 274 dicts ({entity: value}), 13 strings, 12 lists, 10 ints, 1 bool;
- a decomposition is a list of {id, question, answer, depends_on, decomposition, evidence}: 2-46 sub-questions
  (median 6); `depends_on` names sibling ids only (never a parent's or child's); ids are unique within a
  question (11 sub-question ids recur across questions: shared sub-questions);
- 48 of the 1,984 top-level sub-questions (51 at any depth) have a nested decomposition (depth up to 3). The
  top level is kept as the gold DAG; nested ones stay in `GoldSubQuestion.decomposition`, and
  `leaf_decomposition` expands them into one finer DAG.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator, Sequence

from compllm.models.errors import MissingPackageError
from compllm.models.sources import package_dir

PACKAGE, VERSION, MODULE, FILE = "fanoutqa", "1.1.1", "fanoutqa", "data/fanout-final-dev.json"


@dataclass(frozen=True)
class GoldSubQuestion:
    id: str
    question: str
    answer_strings: tuple[str, ...]
    depends_on: tuple[str, ...]  # ids of sibling sub-questions whose answers this one needs
    decomposition: tuple["GoldSubQuestion", ...] = ()  # nested gold decomposition of this sub-question, if any


@dataclass(frozen=True)
class FanOutItem:
    id: str
    question: str
    answer_strings: tuple[str, ...]  # score with textmetrics.answer_containment (FanOutQA loose accuracy)
    decomposition: tuple[GoldSubQuestion, ...]  # top-level gold DAG, in file order
    categories: tuple[str, ...] = ()


def answer_strings(answer: Any) -> tuple[str, ...]:
    """Flatten a FanOutQA answer into the strings its loose accuracy looks for.

    Follows fanoutqa/eval/string.py `answer_in_text`: a list contributes each element, a dict its keys and
    then its values (both count, so a dict of n entries is 2n strings), a bool is "yes"/"no", anything else
    is `str(x)`. Duplicates are kept (they are counted twice there too). One deviation: empty strings are
    dropped (FanOutQA's regex `\\b\\b` counts them as always found; one dev answer has one).
    For the answers in the data (lists and dicts of primitives) found/len(strings) equals FanOutQA's score.
    """
    if isinstance(answer, list):
        return tuple(s for a in answer for s in answer_strings(a))
    if isinstance(answer, dict):
        return tuple(s for a in [*answer.keys(), *answer.values()] for s in answer_strings(a))
    if isinstance(answer, bool):
        return ("yes" if answer else "no",)
    text = str(answer)
    return (text,) if text.strip() else ()


def fanoutqa_dev_path() -> Path:
    root = package_dir(MODULE)
    if root is None:
        raise MissingPackageError("the FanOutQA dev set", [f"{PACKAGE}=={VERSION}"])
    if not (root / FILE).is_file():
        raise MissingPackageError("the FanOutQA dev set", [], [f"{PACKAGE}=={VERSION}"], [f"{root / FILE} is missing"])
    return root / FILE


def _sub(d: dict) -> GoldSubQuestion:
    return GoldSubQuestion(str(d["id"]), d["question"].strip(), answer_strings(d["answer"]),
                           tuple(str(x) for x in d.get("depends_on") or ()),
                           tuple(_sub(c) for c in d.get("decomposition") or ()))


def _check_dag(owner: str, subs: Sequence[GoldSubQuestion]) -> None:
    ids = [s.id for s in subs]
    if len(set(ids)) != len(ids):
        raise ValueError(f"FanOutQA {owner}: duplicate sub-question ids {ids}")
    for s in subs:
        unknown = set(s.depends_on) - set(ids)
        if unknown:
            raise ValueError(f"FanOutQA {owner}: sub-question {s.id} depends on unknown ids {sorted(unknown)}")
        _check_dag(f"{owner}/{s.id}", s.decomposition)


@lru_cache(maxsize=1)
def load_fanoutqa_dev() -> tuple[FanOutItem, ...]:
    """All 310 dev questions in file order; ids are FanOutQA's own."""
    with fanoutqa_dev_path().open(encoding="utf-8") as f:
        rows = json.load(f)
    items = []
    for row in rows:
        item = FanOutItem(str(row["id"]), row["question"].strip(), answer_strings(row["answer"]),
                          tuple(_sub(d) for d in row["decomposition"]), tuple(row.get("categories") or ()))
        _check_dag(item.id, item.decomposition)
        items.append(item)
    return tuple(items)


def leaf_decomposition(subs: Sequence[GoldSubQuestion]) -> tuple[GoldSubQuestion, ...]:
    """The DAG with every nested sub-question replaced by its own decomposition, recursively.

    Graph substitution: the children's roots (those with no sibling dependency) inherit the parent's
    dependencies, and whatever depended on the parent depends on the children's sinks (those no sibling
    depends on). The result's nodes have no nested `decomposition`.
    """
    sources: dict[str, tuple[str, ...]] = {}  # replaced parent id -> ids that stand for it as a dependency
    out: list[GoldSubQuestion] = []
    for s in subs:
        if not s.decomposition:
            out.append(s)
            continue
        inner = leaf_decomposition(s.decomposition)
        needed = {d for c in inner for d in c.depends_on}
        local = {c.id for c in inner}
        sources[s.id] = tuple(c.id for c in inner if c.id not in needed)
        for c in inner:
            deps = c.depends_on if set(c.depends_on) & local else tuple(dict.fromkeys((*s.depends_on, *c.depends_on)))
            out.append(GoldSubQuestion(c.id, c.question, c.answer_strings, deps))
    return tuple(
        GoldSubQuestion(s.id, s.question, s.answer_strings,
                        tuple(dict.fromkeys(x for d in s.depends_on for x in sources.get(d, (d,)))))
        for s in out
    )


def iter_subquestions(subs: Sequence[GoldSubQuestion]) -> Iterator[GoldSubQuestion]:
    """Every sub-question, nested ones after their parent (pre-order)."""
    for s in subs:
        yield s
        yield from iter_subquestions(s.decomposition)


def exemplars(ids: Sequence[str]) -> list[dict[str, Any]]:
    """Planner few-shot examples from FanOutQA dev items (`decomposer.fanoutqa_exemplars`): each item's top-level
    gold DAG in dependency order, as {query, subqueries: [{question, depends_on: 1-based positions}]}. Evaluations
    leave these items out (`without`)."""
    by_id = {item.id: item for item in load_fanoutqa_dev()}
    unknown = [i for i in ids if i not in by_id]
    if unknown:
        raise ValueError(f"decomposer.fanoutqa_exemplars: {unknown} are not FanOutQA dev ids "
                         f"(see {fanoutqa_dev_path()})")
    out = []
    for i in ids:
        subs = list(by_id[i].decomposition)
        order: list[GoldSubQuestion] = []
        while subs:  # gold DAGs are acyclic (checked at load): take the first part whose dependencies are placed
            placed = {s.id for s in order}
            nxt = next(s for s in subs if set(s.depends_on) <= placed)
            order.append(nxt)
            subs.remove(nxt)
        position = {s.id: n for n, s in enumerate(order, start=1)}
        out.append({"query": by_id[i].question,
                    "subqueries": [{"question": s.question, "depends_on": sorted(position[d] for d in s.depends_on)}
                                   for s in order]})
    return out


def without(items: Sequence[FanOutItem], exclude: Sequence[str]) -> list[FanOutItem]:
    """`items` less the ones whose id is in `exclude` (the planner's exemplars: never evaluated on)."""
    skip = set(exclude)
    return [item for item in items if item.id not in skip]
