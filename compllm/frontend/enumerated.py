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


# ----------------------------------------------------------------------------- references between numbered parts
#
# The rule (README "Numbered questions"): part j depends on part k when its text
#   * names k explicitly: "#k", "question k", "part k", "Qk", "the answer to (question) k", "answer k"; or
#   * points back without a number: "the previous/last/preceding/above answer|question|part|result|one",
#     "the answer above", "that answer" (-> part j-1); or
#   * starts a noun phrase with a demonstrative ("that author", "this country", "those films", "the same person",
#     "the aforementioned ...") or uses a personal pronoun ("he", "she", "his", "her", "him", "they", "their",
#     "them") (-> part j-1, from part 2 on).
# A missed edge answers a part without the answer it needs; a spurious one only makes it wait for (and read) the
# part before it. So the implicit rules err towards edges; "that" after a verb of saying or believing ("true that",
# "know that") or before a verb or function word ("that is") is not a reference.
# Parts run in the order the user numbered them, so a reference to a later part ("using the answer to question 3"
# written in question 1) cannot become an edge: it is dropped with a warning, and when it closes a loop with the
# backward edges (1 needs 2, 2 needs 1) the warning names the cycle.

_EXPLICIT = re.compile(
    r"#\s*(\d{1,2})\b"
    r"|\b(?:question|part|q|answer|step|item)\s*(?:no\.?|number|#)?\s*(\d{1,2})\b"
    r"|\b(?:answer|result|response)s?\s+(?:to|of|from|for|in)\s+(?:the\s+)?(?:question|part|q|step|item|number|#)"
    r"\s*(?:no\.?|#)?\s*(\d{1,2})\b",
    re.IGNORECASE)
_PREVIOUS = re.compile(
    r"\b(?:the\s+)?(?:previous|last|preceding|prior|above|former|earlier)\s+(?:answer|question|part|result|one|response)s?\b"
    r"|\b(?:the\s+)?(?:answer|result|response)\s+(?:above|before)\b|\bthat\s+answer\b",
    re.IGNORECASE)
_DEMONSTRATIVE = re.compile(
    r"(?<![\w'])(?P<lead>\w+\s+)?(?P<det>that|this|these|those|the\s+same|the\s+aforementioned|said)\s+(?P<word>[A-Za-z][\w-]*)",
    re.IGNORECASE)
_PRONOUN = re.compile(r"\b(?:he|she|him|his|her|hers|they|them|their|theirs)\b", re.IGNORECASE)
_NOT_A_NOUN = frozenset(
    "is was are were be been being has have had do does did can could will would shall should may might must "
    "a an the it its he she they we you i of in on at to for by with from and or but if as than so not no "
    "which who whom whose what when where why how there here much many more most".split())
_CLAUSE_LEAD = frozenset(
    "true false know knew known say says said think thinks thought believe believes believed so such fact claim "
    "claims show shows prove proves mean means meant suggest suggests than given assuming assume that".split())


def numbered_references(parts: list[str]) -> tuple[list[tuple[int, ...]], list[str]]:
    """Each part's dependencies (1-based numbers of earlier parts) under the rule above, and warnings for
    references that cannot be edges (to itself, to a missing or a later part; a cycle is named)."""
    n = len(parts)
    deps: list[set[int]] = [set() for _ in parts]
    forward: list[tuple[int, int]] = []  # (part, later part it refers to)
    warnings: list[str] = []
    for j, text in enumerate(parts, start=1):
        for m in _EXPLICIT.finditer(text):
            k = int(next(g for g in m.groups() if g))
            if k == j:
                continue  # "question 2" inside question 2 names itself, not an answer it needs
            if not 1 <= k <= n:
                warnings.append(f"question {j} refers to question {k}, which the query does not have; ignored")
            elif k > j:
                forward.append((j, k))
            else:
                deps[j - 1].add(k)
        if j > 1 and not deps[j - 1] and _points_back(text):
            deps[j - 1].add(j - 1)
    for j, k in dict.fromkeys(forward):
        cycle = _path(deps, k, j)
        if cycle:
            loop = " -> ".join(str(x) for x in [j, *cycle])
            warnings.append(f"dependency cycle among the numbered questions ({loop}: each needs the next one's "
                            f"answer); they cannot all wait for each other, so question {j} is answered without "
                            f"question {k}'s answer")
        else:
            warnings.append(f"question {j} refers to the later question {k}; numbered questions are answered in "
                            f"order, so question {j} is answered without question {k}'s answer")
    return [tuple(sorted(d)) for d in deps], warnings


def _points_back(text: str) -> bool:
    """An implicit reference to the part before: 'the previous answer', 'that author', 'he', ..."""
    if _PREVIOUS.search(text) or _PRONOUN.search(text):
        return True
    for m in _DEMONSTRATIVE.finditer(text):
        lead = (m.group("lead") or "").strip().lower()
        if m.group("word").lower() in _NOT_A_NOUN or lead in _CLAUSE_LEAD:
            continue
        return True
    return False


def _path(deps: list[set[int]], start: int, goal: int) -> list[int]:
    """Parts from `start` back to `goal` along dependency edges (start needs ... needs goal), or [] if none."""
    stack, seen = [(start, [start])], {start}
    while stack:
        node, path = stack.pop()
        if node == goal:
            return path
        for d in deps[node - 1]:
            if d not in seen:
                seen.add(d)
                stack.append((d, path + [d]))
    return []
