"""StrategyQA (2,290 yes/no questions whose reasoning steps are implicit) from BIG-bench's `strategyqa` task.

The data ships in the `bigbench==1.0.0` sdist as `bigbench/benchmark_tasks/strategyqa/task.json`; the
package is installed with --no-deps and never imported (its file is found with find_spec). pip >= 26.3
refuses to install or even download it from PyPI ("Distributions from PyPI cannot declare direct URL
dependencies": its metadata names a local bleurt zip), so it is installed with pip 26.2.1 run from its
wheel, see requirements/strategyqa.txt and `INSTALL_HINT`. Building it takes about 1-2 minutes.

Each BIG-bench example is {"input": question, "target_scores": {"Yes": 0|1, "No": 0|1},
"target": "Yes. <fact>. <fact>."}; the facts are StrategyQA's annotated supporting evidence.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from compllm.models.errors import MissingPackageError
from compllm.models.sources import package_dir

PACKAGE, VERSION, MODULE, FILE = "bigbench", "1.0.0", "bigbench", "benchmark_tasks/strategyqa/task.json"
INSTALL_HINT = (
    "NOTE: pip >= 26.3 refuses bigbench 1.0.0 (its metadata declares a direct-URL dependency), so with such a pip "
    "run pip 26.2.1 from its wheel instead (same python; the build takes 1-2 minutes):\n"
    "    pip download --no-deps -d /tmp/pip26.2.1 pip==26.2.1\n"
    "    python /tmp/pip26.2.1/pip-26.2.1-py3-none-any.whl/pip install --no-deps bigbench==1.0.0"
)

# Facts are joined sentences; these tokens end with "." but do not end a sentence (the second set only
# when a lowercase word follows: "Robert Downey Jr. starred" vs "... Dale Jr. The").
_NO_BREAK = {"dr.", "mr.", "mrs.", "ms.", "st.", "mt.", "ft.", "vs.", "c.", "ca.", "approx.", "e.g.", "i.e.", "no."}
_NO_BREAK_BEFORE_LOWER = {"jr.", "sr.", "inc.", "bros.", "co.", "corp.", "ltd.", "etc.", "ph.d."}
_OPENERS = {"The", "A", "An", "It", "He", "She", "They", "This", "That", "These", "Those", "There", "In", "On",
            "At", "His", "Her", "Its", "Their", "Some", "Most", "Many", "All", "Each", "Every", "One", "If", "When"}
_BOUNDARY = re.compile(r"[.!?]\s+")
_INITIAL = re.compile(r"^[A-HJ-Z]\.$")  # "F." in "John F. Kennedy"; "I." is usually a Roman numeral
_INITIALS = re.compile(r"^(?:[A-Z]\.){2,}$")  # "J.K.", "U.S.", "D.C.": kept with what follows
_NAME = re.compile(r"^[A-Z][a-z]+$")


def _breaks(token: str, prev: str, nxt: str) -> bool:
    token = token.lstrip("([\"'")
    low = token.lower()
    if low in _NO_BREAK or _INITIALS.match(token):
        return False
    if low in _NO_BREAK_BEFORE_LOWER:
        return not nxt[:1].islower()
    if _INITIAL.match(token):  # "P. G. Wodehouse", "John F. Kennedy", ". F. Scott" but "the letter T. The"
        next_is_name = bool(_NAME.match(nxt)) and nxt not in _OPENERS
        return not (_NAME.match(prev) or _INITIAL.match(prev) or _INITIAL.match(nxt) or next_is_name)
    return True


def split_sentences(text: str) -> list[str]:
    """Sentences of a fact string. A regex splitter tuned on this data (no NLP dependency for one field); a
    few facts still split at or merge across an abbreviation."""
    out, start = [], 0
    for m in _BOUNDARY.finditer(text):
        words = text[start:m.start() + 1].split()
        prev = words[-2] if len(words) > 1 else ""
        nxt = text[m.end():].split(maxsplit=1)[0]
        if _breaks(words[-1], prev, nxt):
            out.append(text[start:m.end()].strip())
            start = m.end()
    out.append(text[start:].strip())
    return [s for s in out if s]


_VERDICT = re.compile(r"^(Yes|No)\.\s*")


@dataclass(frozen=True)
class StrategyQAItem:
    id: str  # "strategyqa-NNNN": position in task.json (fixed for bigbench 1.0.0)
    question: str
    answer: bool
    facts: tuple[str, ...]  # supporting facts, one sentence each (regex split: rare abbreviations may split one)


def strategyqa_path() -> Path:
    root = package_dir(MODULE)
    if root is None:
        raise MissingPackageError("the StrategyQA data set", [f"{PACKAGE}=={VERSION}"], details=[INSTALL_HINT])
    if not (root / FILE).is_file():
        raise MissingPackageError("the StrategyQA data set", [], [f"{PACKAGE}=={VERSION}"],
                                  [f"{root / FILE} is missing", INSTALL_HINT])
    return root / FILE


def _item(index: int, example: dict) -> StrategyQAItem:
    scores = example["target_scores"]
    if sorted(scores.items()) not in ([("No", 0), ("Yes", 1)], [("No", 1), ("Yes", 0)]):
        raise ValueError(f"StrategyQA example {index}: unexpected target_scores {scores!r}")
    answer = scores["Yes"] == 1
    target = example["target"].strip()
    verdict = _VERDICT.match(target)
    if verdict is None or (verdict.group(1) == "Yes") != answer:
        raise ValueError(f"StrategyQA example {index}: target {target[:40]!r} does not start with the gold verdict")
    facts = tuple(split_sentences(target[verdict.end():]))
    return StrategyQAItem(f"strategyqa-{index:04d}", example["input"].strip(), answer, facts)


@lru_cache(maxsize=1)
def load_strategyqa() -> tuple[StrategyQAItem, ...]:
    """All 2,290 examples in file order (one question appears twice, verbatim, in the source; both are kept)."""
    with strategyqa_path().open(encoding="utf-8") as f:
        examples = json.load(f)["examples"]
    return tuple(_item(i, ex) for i, ex in enumerate(examples))
