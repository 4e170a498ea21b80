"""Is a final answer faithful to the experts' answers? Pure-Python metrics for compound questions.

A compound question is answered in parts: the planner splits it into sub-queries, experts answer them, and the
final answer is either joined from their answers (`aggregator.mode=join`) or written by the aggregator model
(`mode=model`). Three questions are asked of every final answer:

* **part_reaches_final** — does every part the final answer must carry reach it *unchanged*?
  The parts it must carry are the *leaves*: the answered sub-queries no other sub-query depends on (`must_carry`).
  That is what `join` prints, and it is the same obligation for `model`: a chain's earlier steps are means to its
  last step (whose answer the expert wrote with the earlier answers in its prompt), so a final answer that carries
  the last step answers the chain, and judging both modes by the same parts compares them on equal terms.
  Two strengths of "unchanged":
    - `verbatim`: the expert's whole answer, whitespace-collapsed and case-folded, is a substring of the final
      answer, also case-folded and whitespace-collapsed. This is what `join` guarantees.
    - `key_fact` (what `mode=model` is judged by): the answer's *key tokens* — the content tokens of its first
      sentence (where the experts put the direct answer) minus stopwords and minus the words of the part's own
      sub-question (so "15% of 240 is 36." has the key token "36") — all appear in one sentence or line of the
      final answer (same light normalisation as below). A one-line restatement keeps every key token; a changed
      fact ("vitamin D" -> "vitamin C"), a dropped part, or a fact spread over two sentences loses one. An answer
      with no key tokens (it only repeats its question) falls back to `verbatim`.
  `reached` = verbatim, or key_fact for `mode=model`.

* **unsupported_sentences** — share of final-answer sentences no sub-answer supports. The final answer is split
  into lines, then sentences (`split_sentences`; list markers such as "1.", "Part 2:", "Fact 1:", "Answer:" are
  dropped). A sentence's
  *content words* are its tokens minus stopwords minus the words of the user's query and of the planner's
  sub-questions (restating the question claims nothing). Its coverage is the share of its content words found
  in the sub-answers (every answered sub-query of the query, chain steps included). It is *supported* when the
  coverage is at least `SUPPORT_THRESHOLD` = 1/2, i.e. at least as many of its content words come from the
  answers as not. Why half: a faithful restatement paraphrases a verb or adds a connective ("can ask for a
  refund" for "has the right to request a refund": 1 of 2 words new), while an added claim brings its own entity
  and predicate, which outnumber the one answer word it hangs on ("Canberra, founded in 1913": 1 of 3 covered),
  and filler ("I hope this helps!") or a changed fact ("vitamin C" for the expert's "vitamin D") covers nothing.
  `bench_answers.py` also reports the share at 2/3 and 1, to show how much the threshold matters.
  Sentences with no content word left — framing words such as "answer", "question", "part" are stopwords, so
  this is filler ("The answer to the question is:") or the question repeated ("Part 1: Which vitamin ...?") —
  are counted as `empty`: they claim nothing, so they are not unsupported, but they are reported, since they
  are what a final answer should not contain either. The pipeline's own notes about missing parts
  ("(Not answered: …)", "(no answer: …)") are counted as notes, not sentences.

* **part_correct** — does the final answer contain an acceptable gold answer for each part of the question,
  and does some expert answer (any answered sub-query of the query: the planner's split need not match the
  gold parts) contain one? Containment is FanOutQA's loose accuracy (`textmetrics.answer_containment`: whole
  words after normalisation), with a digit/letter boundary treated as a space ("0°C" contains "0") and plain
  substring search for CJK gold strings (which have no word boundaries).

Tokens everywhere: `textmetrics.normalize` (lowercase, punctuation and articles dropped, diacritics folded,
thousands separators removed), digits split from letters, each CJK character its own token, number words up to
twenty mapped to digits, and a light suffix stemmer ("prevents" = "prevented") for content-word matching.
`score_query` combines all three per query (with counts); `aggregate` sums queries.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from compllm.data.textmetrics import answer_containment, normalize

SUPPORT_THRESHOLD = 0.5

KINDS = ("independent", "chained", "numbered", "mixed")

STOPWORDS = frozenset("""
a about above after again against all also am an and any are aren as at be because been before being below
between both but by can cannot could did didn do does doesn doing don down during each either else etc few for
from further had has hasn have having he her here hers herself him himself his how however i if in into is isn
it its itself just let like may me might more most must my myself no nor not now of off on once only or other
our ours ourselves out over own per please same she should so some such than that the their theirs them
themselves then there these they this those through thus to too under until up upon us very was wasn we were
weren what when where whereas whether which while who whom whose why will with within without would yes yet you
your yours yourself yourselves
sure certainly here answer answers question questions part parts step steps final following follows
""".split())

NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty".split())}

_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]")
_DIGIT_LETTER = re.compile(r"(?<=\d)(?=[^\W\d_])|(?<=[^\W\d_])(?=\d)")
_NOTE = re.compile(r"^\(?\s*(?:not answered|no answer)\b", re.I)
_MARKER = re.compile(  # "Part 2:", "Fact 1:", "Answer:", "2." / "(2)", "- ", "#"
    r"^\s*(?:(?:part|question|answer|fact|step|q)\s*(?:\d+\s*[:.)\-]|[:)])|\(?\d{1,2}[.)]|[-*\u2022]|#+)\s*", re.I)
_ABBREVIATIONS = frozenset("mr mrs ms dr st vs etc eg ie no approx jr sr prof".split())


# ----------------------------------------------------------------------------------------- the question set

@dataclass(frozen=True)
class GoldPart:
    question: str
    gold: tuple[str, ...]  # acceptable answers, any one is right
    depends_on: tuple[int, ...] = ()  # 0-based indices of earlier parts whose answers this one needs


@dataclass(frozen=True)
class CompoundQuestion:
    id: str
    query: str
    parts: tuple[GoldPart, ...]
    kind: str

    @property
    def leaves(self) -> tuple[int, ...]:
        """Indices of the parts no other part depends on (what a chain leads to)."""
        read = {d for p in self.parts for d in p.depends_on}
        return tuple(i for i in range(len(self.parts)) if i not in read)


def load_questions(path: str | Path) -> list[CompoundQuestion]:
    """Read and check a JSONL set: one {id, query, parts: [{question, gold, depends_on}], kind} per line.
    `depends_on` holds 0-based indices of earlier parts. Raises ValueError naming the line on any defect."""
    out, seen = [], set()
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        rec = json.loads(line)
        if set(rec) != {"id", "query", "parts", "kind"}:
            raise ValueError(f"{where}: keys must be id, query, parts, kind (got {sorted(rec)})")
        if rec["id"] in seen:
            raise ValueError(f"{where}: duplicate id {rec['id']!r}")
        seen.add(rec["id"])
        if rec["kind"] not in KINDS:
            raise ValueError(f"{where}: kind {rec['kind']!r} is not one of {KINDS}")
        parts = []
        for i, p in enumerate(rec["parts"]):
            gold = tuple(p["gold"])
            if not gold or any(not isinstance(g, str) or not normalize(g) for g in gold):
                raise ValueError(f"{where}: part {i} needs non-empty gold strings")
            deps = tuple(p.get("depends_on", ()))
            if any(not isinstance(d, int) or not 0 <= d < i for d in deps):
                raise ValueError(f"{where}: part {i} may depend only on earlier parts (0-based), got {deps}")
            parts.append(GoldPart(p["question"], gold, deps))
        if len(parts) < 2:
            raise ValueError(f"{where}: a compound question has at least 2 parts")
        chained = any(p.depends_on for p in parts)
        if chained != (rec["kind"] in ("chained", "mixed")):
            raise ValueError(f"{where}: kind {rec['kind']!r} does not match its dependencies")
        out.append(CompoundQuestion(rec["id"], rec["query"], tuple(parts), rec["kind"]))
    return out


# ----------------------------------------------------------------------------------------- what a run produced

@dataclass(frozen=True)
class SubAnswer:
    """One sub-query of the planner's split and its expert's answer."""

    index: int  # the planner's 1-based id
    question: str
    answer: str
    depends_on: tuple[int, ...] = ()  # planner ids
    ok: bool = True


def sub_answers(query_result: Any) -> list[SubAnswer]:
    """The sub-answers of a `compllm.runtime.result.QueryResult` (or its `to_dict()` form)."""
    q = query_result if isinstance(query_result, Mapping) else _asdict(query_result)
    nodes = {n["node_id"].rsplit(":", 1)[1]: n for n in q["nodes"] if n["kind"] == "subquery"}
    out = []
    for sq in q["decomposition"]["subqueries"]:
        node = nodes.get(str(sq["index"]))
        ok = node is not None and node["status"] == "ok"
        out.append(SubAnswer(sq["index"], sq["text"], node["answer"] if ok else "", tuple(sq["depends_on"]), ok))
    return out


def _asdict(obj: Any) -> dict:
    from dataclasses import asdict
    return asdict(obj)


def must_carry(subs: Sequence[SubAnswer]) -> list[SubAnswer]:
    """The answered sub-queries no other sub-query depends on: what the final answer must carry."""
    read = {d for s in subs for d in s.depends_on}
    return [s for s in subs if s.index not in read and s.ok and s.answer.strip()]


# ----------------------------------------------------------------------------------------- tokens and sentences

def _squash(text: str) -> str:
    return " ".join(str(text).split()).casefold()


def tokens(text: str) -> list[str]:
    """normalize(), then digits apart from letters, CJK characters one token each, number words as digits."""
    text = normalize(str(text).replace("°", " "))
    text = _DIGIT_LETTER.sub(" ", text)
    text = _CJK.sub(lambda m: f" {m.group(0)} ", text)
    return [NUMBER_WORDS.get(t, t) for t in text.split()]


def stem(word: str) -> str:
    """A light suffix stemmer, enough to match inflections of one word ("prevents", "prevented", "cities")."""
    if len(word) <= 3 or not word.isalpha():
        return word
    for suffix, repl in (("ies", "y"), ("ing", ""), ("ed", ""), ("es", ""), ("ly", ""), ("s", "")):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            return word[: -len(suffix)] + repl
    return word


def content_words(text: str, drop: Iterable[str] = ()) -> list[str]:
    """Stemmed tokens of `text` that are not stopwords and not in `drop` (already stemmed words)."""
    dropped = set(drop)
    return [s for s in (stem(t) for t in tokens(text) if t not in STOPWORDS) if s not in dropped]


def question_words(*texts: str) -> set[str]:
    """Stemmed tokens of the question texts: the words a sentence gets for free by restating the question."""
    return {stem(t) for text in texts for t in tokens(text)}


def split_sentences(text: str) -> list[str]:
    """Lines, then sentences; list markers ("1.", "2)", "Part 3:", "- ") dropped; empty pieces left out.

    A sentence ends at . ! ? (followed by a space) or 。！？; not after an initial ("George H. W. Bush": a capital
    letter after a capitalised word, before a capitalised word other than a stopword), a dotted abbreviation
    ("Washington, D.C. is"), a list marker ("1. Paris") or an abbreviation
    ("Dr.")."""
    out = []
    for line in str(text).splitlines():
        start = 0
        pieces = []
        for m in re.finditer(r"[.!?]+(?=\s)|[。！？]+", line):
            before = line[start:m.start()].split()
            last = before[-1] if before else ""
            after = line[m.end():].split()
            initial = (len(last) == 1 and last.isupper() and len(before) > 1 and before[-2][:1].isupper()
                       and bool(after) and after[0][:1].isupper()  # "George H. W. Bush", not "vitamin C. Next"
                       and normalize(after[0]) not in STOPWORDS)  # nor "Vitamin C. It is ..."
            dotted = "." in last.strip(".")  # "D.C.", "U.S.", "e.g."
            if m.group(0).startswith(".") and (initial or dotted or last.lower() in _ABBREVIATIONS
                                               or (last.isdigit() and len(before) == 1)):
                continue
            pieces.append(line[start:m.end()])
            start = m.end()
        pieces.append(line[start:])
        for piece in pieces:
            piece = piece.strip()
            while True:  # "1. Part 1: Paris" -> "Paris"; but "2. 36." -> "36.", not ""
                stripped = _MARKER.sub("", piece, count=1).strip()
                if stripped == piece or not re.search(r"\w", stripped):
                    break
                piece = stripped
            if re.search(r"\w", piece):
                out.append(piece)
    return out


# ----------------------------------------------------------------------------------------- the three metrics

def verbatim_in(answer: str, final: str) -> bool:
    """The answer, whitespace-collapsed and case-folded, is a substring of the final answer."""
    a = _squash(answer)
    return bool(a) and a in _squash(final)


def first_sentence(text: str) -> str:
    sentences = split_sentences(text)
    return sentences[0] if sentences else str(text).strip()


def key_tokens(answer: str, question: str) -> list[str]:
    """The content words of the answer's first sentence that its own sub-question does not already contain."""
    return list(dict.fromkeys(content_words(first_sentence(answer), question_words(question))))


def part_reaches_final(sub: SubAnswer, final: str, mode: str) -> dict[str, Any]:
    """{index, verbatim, key_fact, reached, key}: see the module docstring for the two strengths."""
    verbatim = verbatim_in(sub.answer, final)
    key = key_tokens(sub.answer, sub.question)
    if key:
        need = set(key)
        key_fact = any(need <= set(content_words(s)) for s in split_sentences(final) or [final])
    else:
        key_fact = verbatim
    return {"index": sub.index, "verbatim": verbatim, "key_fact": key_fact or verbatim,
            "reached": verbatim or (mode == "model" and key_fact), "key": key}


def sentence_support(sentence: str, answer_words: set[str], drop: set[str],
                     threshold: float = SUPPORT_THRESHOLD) -> dict[str, Any]:
    """Coverage of one sentence's content words by the sub-answers' words; `supported` at >= threshold."""
    words = list(dict.fromkeys(content_words(sentence, drop)))
    if not words:
        return {"sentence": sentence, "words": [], "missing": [], "coverage": 1.0, "supported": True, "empty": True}
    missing = [w for w in words if w not in answer_words]
    coverage = 1 - len(missing) / len(words)
    return {"sentence": sentence, "words": words, "missing": missing, "coverage": coverage,
            "supported": coverage >= threshold - 1e-9, "empty": False}


def unsupported_sentences(final: str, query: str, subs: Sequence[SubAnswer],
                          threshold: float = SUPPORT_THRESHOLD) -> dict[str, Any]:
    """Per sentence of the final answer: its support by the sub-answers; counts of sentences, unsupported,
    empty (nothing but the question's words) and notes (the pipeline's "(Not answered: …)")."""
    drop = question_words(*split_sentences(query), *(s.question for s in subs))  # the query's "1." is no word
    answer_words = {w for s in subs if s.ok for w in content_words(s.answer)}
    rows, notes = [], 0
    for sentence in split_sentences(final):
        if _NOTE.match(sentence):
            notes += 1
            continue
        rows.append(sentence_support(sentence, answer_words, drop, threshold))
    unsupported = [r for r in rows if not r["supported"]]
    return {"sentences": len(rows), "unsupported": len(unsupported), "empty": sum(r["empty"] for r in rows),
            "notes": notes, "unsupported_text": [r["sentence"] for r in unsupported], "rows": rows}


def contains_gold(text: str, gold: Sequence[str]) -> bool:
    """Some acceptable answer is in `text`: whole words after normalisation (CJK gold: as a substring)."""
    if not text:
        return False
    spaced = " ".join(tokens(text))
    for g in gold:
        if _CJK.search(g):
            if normalize(g).replace(" ", "") in normalize(text).replace(" ", ""):
                return True
        elif answer_containment(spaced, [" ".join(tokens(g))]) == 1.0:
            return True
    return False


def part_correct(final: str, subs: Sequence[SubAnswer], parts: Sequence[GoldPart]) -> list[dict[str, Any]]:
    """Per gold part: is a gold answer in the final answer, and in some expert answer of the query?"""
    answers = ["\n".join(split_sentences(s.answer)) for s in subs if s.ok]
    final = "\n".join(split_sentences(final))  # without list markers: "2." is not an answer "2"
    return [{"part": i, "final": contains_gold(final, p.gold), "expert": any(contains_gold(a, p.gold) for a in answers)}
            for i, p in enumerate(parts)]


def missing_stated(final: str, subs: Sequence[SubAnswer], omitted: str = "") -> bool | None:
    """When some part went unanswered (a failed sub-query, or parts over the planner's cap), does the final
    answer say so? None when nothing was missing."""
    if not omitted and all(s.ok for s in subs):
        return None
    return bool(re.search(r"not answered|no answer", final, re.I))


# ----------------------------------------------------------------------------------------- per query, in total

@dataclass
class QueryScore:
    id: str
    mode: str
    carried: list[dict[str, Any]] = field(default_factory=list)
    sentences: dict[str, Any] = field(default_factory=dict)
    correct: list[dict[str, Any]] = field(default_factory=list)
    leaves: tuple[int, ...] = ()
    missing_stated: bool | None = None

    def counts(self) -> dict[str, Any]:
        leaf = [c for c in self.correct if c["part"] in self.leaves]
        return {
            "must_carry": len(self.carried),
            "verbatim": sum(c["verbatim"] for c in self.carried),
            "key_fact": sum(c["key_fact"] for c in self.carried),
            "reached": sum(c["reached"] for c in self.carried),
            "sentences": self.sentences.get("sentences", 0),
            "unsupported": self.sentences.get("unsupported", 0),
            "empty": self.sentences.get("empty", 0),
            "gold_parts": len(self.correct),
            "final_correct": sum(c["final"] for c in self.correct),
            "expert_correct": sum(c["expert"] for c in self.correct),
            "gold_leaves": len(leaf),
            "final_correct_leaves": sum(c["final"] for c in leaf),
            "expert_correct_leaves": sum(c["expert"] for c in leaf),
            "missing": self.missing_stated is not None,
            "missing_stated": bool(self.missing_stated),
        }

    def to_dict(self) -> dict[str, Any]:
        sentences = {k: v for k, v in self.sentences.items() if k != "rows"}
        sentences["coverage"] = [round(r["coverage"], 3) for r in self.sentences.get("rows", [])]
        return {"id": self.id, "mode": self.mode, "counts": self.counts(), "carried": self.carried,
                "sentences": sentences, "correct": self.correct}


def score_query(qid: str, mode: str, final: str, query: str, subs: Sequence[SubAnswer],
                gold: CompoundQuestion | None = None, omitted: str = "",
                threshold: float = SUPPORT_THRESHOLD) -> QueryScore:
    """All three metrics for one query's final answer. `mode` is "join" or "model"."""
    if mode not in ("join", "model"):
        raise ValueError(f"mode must be 'join' or 'model', got {mode!r}")
    return QueryScore(
        qid, mode,
        carried=[part_reaches_final(s, final, mode) for s in must_carry(subs)],
        sentences=unsupported_sentences(final, query, subs, threshold),
        correct=part_correct(final, subs, gold.parts) if gold is not None else [],
        leaves=gold.leaves if gold is not None else (),
        missing_stated=missing_stated(final, subs, omitted),
    )


def aggregate(counts: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Sum per-query counts; add the shares (None where the denominator is 0)."""
    total: dict[str, Any] = {"queries": 0}
    for c in counts:
        total["queries"] += 1
        for k, v in c.items():
            total[k] = total.get(k, 0) + int(v)

    def share(num: str, den: str) -> float | None:
        return total.get(num, 0) / total[den] if total.get(den) else None

    total["share_reached"] = share("reached", "must_carry")
    total["share_verbatim"] = share("verbatim", "must_carry")
    total["share_unsupported"] = share("unsupported", "sentences")
    total["final_accuracy"] = share("final_correct", "gold_parts")
    total["expert_accuracy"] = share("expert_correct", "gold_parts")
    total["final_accuracy_leaves"] = share("final_correct_leaves", "gold_leaves")
    total["expert_accuracy_leaves"] = share("expert_correct_leaves", "gold_leaves")
    return total
