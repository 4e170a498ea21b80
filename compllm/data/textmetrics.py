"""String metrics for scoring free-text answers of small LLMs: normalisation, answer containment (FanOutQA's
loose accuracy), token F1 (SQuAD), and tolerant extraction of yes/no and multiple-choice letters.

Model output is data: it is only read with regular expressions. Parsers return None rather than guess when
an answer is absent or contradictory, so a benchmark counts "no answer" separately from "wrong answer".
"""
from __future__ import annotations

import re
import unicodedata
from collections import Counter
from typing import Sequence

_ARTICLES = re.compile(r"\b(?:a|an|the)\b")
_NUMBER_COMMAS = re.compile(r"(?<=\d),(?=\d{3}\b)")
_SPACE_LIKE = {"/", "\\", "|", "_", "+", "="}


def _char_class(ch: str) -> str:
    """' ' for separators (dashes, slashes), '' for other punctuation and symbols, else the character."""
    if ch in _SPACE_LIKE or unicodedata.category(ch) == "Pd":
        return " "
    if unicodedata.category(ch)[0] in "PS":
        return ""
    return ch


def normalize(text: str) -> str:
    """SQuAD-style: lowercase, drop punctuation, articles and extra whitespace.

    Beyond SQuAD, for LLM output: diacritics are folded ("São" == "Sao"), thousands separators are dropped
    ("1,234" == "1234", as FanOutQA does), dashes and slashes separate words ("Coca-Cola" == "Coca Cola"),
    and all Unicode punctuation/symbols (curly quotes, "%", "$") are removed, not just ASCII ones.
    """
    text = unicodedata.normalize("NFKD", str(text))
    text = "".join(ch for ch in text if not unicodedata.combining(ch)).lower()
    text = _NUMBER_COMMAS.sub("", text)
    text = "".join(_char_class(ch) for ch in text)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _nonempty_gold(gold: Sequence[str]) -> list[str]:
    if isinstance(gold, str):
        raise TypeError("gold must be a sequence of strings, not one string (wrap it in a list)")
    normed = [normalize(g) for g in gold]
    kept = [g for g in normed if g]
    if not kept:
        raise ValueError(f"no gold answer string is left after normalisation: {list(gold)!r}")
    return kept


def answer_containment(pred: str, gold: Sequence[str]) -> float:
    """Fraction of gold strings found, as whole words, in the normalised prediction.

    This is FanOutQA's "loose accuracy" (fanoutqa/eval/string.py `answer_in_text`: each flattened reference
    string is searched with word boundaries in the normalised candidate; score = found / total), with
    compllm's `normalize` instead of FanOutQA's spaCy lemmatiser, so inflection differences count as misses.
    Gold strings that normalise to "" (e.g. an empty annotation) are skipped rather than counted as free hits.
    """
    golds = _nonempty_gold(gold)
    padded = f" {normalize(pred)} "
    return sum(f" {g} " in padded for g in golds) / len(golds)


def _f1(pred_tokens: list[str], gold_tokens: list[str]) -> float:
    common = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred_tokens), common / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def token_f1(pred: str, gold: Sequence[str]) -> float:
    """SQuAD token F1 of the normalised prediction, maximised over alternative gold strings.

    `gold` lists alternatives (any one is a full answer). For a multi-part answer that must be given whole
    (a FanOutQA list or dict), pass one string, e.g. `[" ".join(item.answer_strings)]`.
    """
    pred_tokens = normalize(pred).split()
    return max(_f1(pred_tokens, g.split()) for g in _nonempty_gold(gold))


# ---------------------------------------------------------------- yes / no

_MARKUP = re.compile(r"\*\*|__|`|~~|[*#]")
_TEMPLATE = re.compile(r"\(?\b(?:yes\s*/\s*no|yes\s+or\s+no|true\s*/\s*false|true\s+or\s+false)\b\)?")
_WORD = {"yes": True, "no": False, "true": True, "false": False}
_EXPLICIT_YN = re.compile(
    r"\banswer\b(?:\s+(?:to\s+(?:this|the|your)\s+question\s+)?(?:is|would\s+be|will\s+be|=))?\s*:?\s*[\"'(\[]*\s*"
    r"(yes|no|true|false)\b")
_CLAUSE_YN = re.compile(
    r"(?:^|[.!?;:\n(\"']\s*|\b(?:so|thus|therefore|hence|then|but|overall|in\s+short|in\s+conclusion|in\s+summary),?\s+)"
    r"(yes|no)\b(?!\s*(?:one|longer|more|matter|doubt|idea|less|way|evidence|record)\b)")
_BOTH = re.compile(r"^\W*(?:yes|no)\s*(?:and|or|&|/)\s*(?:yes|no)\b")


def parse_yes_no(text: str) -> bool | None:
    """True / False for a yes-no answer in free text; None when there is none or it contradicts itself.

    An explicit "answer is X" / "Answer: X" decides (the last one: small models often revise). Otherwise
    every "yes"/"no" that opens the text or a clause ("No, because...", "..., so no.") and a leading
    "true"/"false" must agree. A "no" inside a sentence ("there is no evidence") is not an answer.
    """
    if not text:
        return None
    t = _TEMPLATE.sub(" ", _MARKUP.sub("", unicodedata.normalize("NFKC", text).lower()))
    t = t.replace("\u2019", "'").strip()
    explicit = _EXPLICIT_YN.findall(t)
    if explicit:
        return _WORD[explicit[-1]]
    if _BOTH.match(t):
        return None
    found = {_WORD[w] for w in _CLAUSE_YN.findall(t)}
    first = re.match(r"^\W*(true|false)\b", t)
    if first:
        found.add(_WORD[first.group(1)])
    return found.pop() if len(found) == 1 else None


# ---------------------------------------------------------------- multiple-choice letters

# A part label: "Question 2:", "Part 2 -", "Q2.", "Answer 2:", "#2", or a bare "2." / "2)" / "2:" at a line start.
_KEYWORD_LABEL = re.compile(
    r"\b(?:question|part|problem|item|answer|q)\s*#?\s*(\d+)\b\s*(?:[:.,)\]\-\u2013\u2014=]|\bis\b)?", re.I)
_LINE_LABEL = re.compile(r"^[ \t]*(?:[-*\u2022>]\s*)?[(\[]?(\d+)\s*[:.)\]\-\u2013\u2014=](?!\d)", re.M)
_INLINE_LABEL = re.compile(r"(?<![\w.,])(\d+)\s*[:.)\-\u2013=]\s*(?=\(?[A-D]\)?(?![\w]))")
_EXPLICIT_LETTER = re.compile(
    r"\b(?i:answer|option|choice)\b[^.\n]{0,25}?(?i:\bis\b|:|=|\boption\b|\bchoice\b)\s*[\"'(\[]*\s*"
    r"([A-D]|[a-d](?=\s*[).:,]|\s*$))\b(?![\w'])"
    r"|\b(?i:answer|option|choice|choose|pick|select|go\s+with)\s+(?i:option\s+)?\(?([A-D])\b(?![\w'])"
    r"|\b(?i:is)\s+\(?([A-D])\b(?![\w'])(?:\s*[).:,]|\s*$)")
_LEADING_LETTER = re.compile(
    r"^[\s\"'\[(]*(?:([A-Da-d])(?=\s*(?:[).:,\]\-\u2013\u2014]|$))|([B-D])(?=\s))")  # "A lawyer...": article
_PAREN_LETTER = re.compile(r"[(\[]([A-Da-d])[)\]]")


def _letter(segment: str) -> str | None:
    """The choice letter a segment of an answer gives, or None."""
    seg = segment.strip()
    explicit = [next(g for g in m.groups() if g) for m in _EXPLICIT_LETTER.finditer(seg)]
    if explicit:
        return explicit[-1].upper()
    lead = _LEADING_LETTER.match(seg)
    if lead:
        return (lead.group(1) or lead.group(2)).upper()
    paren = _PAREN_LETTER.search(seg)
    if paren:
        return paren.group(1).upper()
    return None


def _labels(text: str, k: int) -> list[tuple[int, int, int]]:
    """(start, end, part number) of every part label for parts 1..k, in text order, overlaps removed."""
    found = []
    for pattern in (_KEYWORD_LABEL, _LINE_LABEL, _INLINE_LABEL):
        for m in pattern.finditer(text):
            n = int(m.group(1))
            if 1 <= n <= k:
                found.append((m.start(), m.end(), n))
    found.sort()
    out: list[tuple[int, int, int]] = []
    for start, end, n in found:
        if out and start < out[-1][1]:
            if n == out[-1][2]:  # the same label seen by two patterns: keep the longer span
                out[-1] = (out[-1][0], max(end, out[-1][1]), n)
            continue
        out.append((start, end, n))
    return out


def _pieces(text: str) -> list[str]:
    """Unlabelled answers: one piece per non-empty line, or per sentence when it is all one line."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if len(lines) > 1:
        return lines
    return [s for s in re.split(r"(?<=[.!?;])\s+", text) if s.strip()]


def parse_choice_letters(text: str, k: int) -> list[str | None]:
    """The letter (A-D) given for each of k parts of a compound multiple-choice question; None where absent.

    Parts are found by their labels ("1: B", "1. (B) ...", "Question 2: C", "Part 2: the answer is C",
    "1-B, 2-C"); when a part is labelled twice (a model restating the questions, then answering) the last
    label with a letter wins. Without labels, lines (or sentences) that carry a letter are taken in order,
    and k=1 reads the whole text ("Answer: B", "(B)"). Within a part an explicit "answer is X" beats a
    leading letter, which beats the first parenthesised "(X)"; a bare capital inside prose ("vitamin C")
    is never taken for a choice.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    text = _MARKUP.sub("", unicodedata.normalize("NFKC", text or ""))
    out: list[str | None] = [None] * k
    labels = _labels(text, k)
    if labels:
        for (start, end, n), nxt in zip(labels, labels[1:] + [(len(text), 0, 0)]):
            letter = _letter(text[end:nxt[0]])
            if letter:
                out[n - 1] = letter
        return out
    if k == 1:
        whole = _letter(text)
        if whole:
            return [whole]
    letters = [x for x in (_letter(p) for p in _pieces(text)) if x]
    for i, letter in enumerate(letters[:k]):
        out[i] = letter
    return out
