"""Queries that number their own questions ("Question 1: … Question 2: …", "1) … 2) …") are split at the
numbers, verbatim, without a model call.

Why: a user who enumerated the questions already did the decomposition. Re-emitting them through a small
decomposer LLM costs a decode step per copied token and, on Qwen2.5-Coder-0.5B, mostly fails: given 6 meqa_p
queries it answered the questions instead of listing them (6/6 fell back). Free-form queries still go to the
LLM. Text before the first marker (a request such as "Please answer these 3 questions.") is left to the
aggregator, which sees the whole query; `decomposer.split_enumerated=false` turns this off for ablations.
"""
from __future__ import annotations

import re

# "Question 3:", "Q3.", "Part 3)" anywhere after a space; bare "3." / "3)" / "(3)" only where a sentence or
# line starts, so "options 1. and 2." in running text is not a list.
_MARKER = re.compile(
    r"(?:(?<=\s)|^)(?:Question|Q|Part)\s*(\d{1,2})\s*[:.)]\s+"
    r"|(?:^|(?<=[.?!:]\s)|(?<=\n))\(?(\d{1,2})[.)]\s+",
    re.IGNORECASE,
)


def split_enumerated(query: str, min_parts: int = 2) -> list[str] | None:
    """The numbered questions in order, or None unless the markers run 1, 2, …, k with k >= `min_parts`."""
    starts: list[tuple[int, int]] = []  # (marker start, text start) of markers continuing the count
    for m in _MARKER.finditer(query):
        number = int(next(g for g in m.groups() if g))
        if number == len(starts) + 1:
            starts.append((m.start(), m.end()))
    if len(starts) < min_parts:
        return None
    bounds = [s for s, _ in starts[1:]] + [len(query)]
    parts = [query[text_start:end].strip() for (_, text_start), end in zip(starts, bounds)]
    parts[-1] = strip_closing_instruction(parts[-1])
    return parts if all(parts) else None


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_ABOUT_ALL = re.compile(r"\b(?:each|every|all|these|both|per)\b.*\b(?:questions?|parts?|answers?)\b"
                        r"|\b(?:questions|parts|answers)\b", re.IGNORECASE)
_DIRECTIVE = re.compile(r"\b(?:reply|answer|respond|format|form|write|give|list|number)\b", re.IGNORECASE)


def strip_closing_instruction(last: str) -> str:
    """Drop trailing sentences addressed to all the questions ("Reply with one line per question …"): they
    belong to the whole query, which the aggregator sees, not to the last question's expert."""
    sentences = _SENTENCE_END.split(last)
    while len(sentences) > 1 and _ABOUT_ALL.search(sentences[-1]) and _DIRECTIVE.search(sentences[-1]):
        sentences.pop()
    return " ".join(sentences)
