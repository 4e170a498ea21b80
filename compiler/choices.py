"""Multiple-choice nodes: their option letters, read from the question text (IR-level meaning of `choice`).

Why: a `choice` node is answered by scoring its option letters at the first answer token (one prefill, no
decoding), the way MMLU is evaluated, instead of hoping a small model writes a parsable letter; it is also
cheaper (paper_accuracy: a chunk of 8 meqa_p items in 39.4 s median against 78.2 s in free text, 40 items).
Decomposition is what makes this possible: one model asked several
questions at once can only be answered in free text.
"""
from __future__ import annotations

import re

_OPTION = re.compile(r"\(([A-J])\)\s*\S")


def option_letters(text: str) -> tuple[str, ...]:
    """The letters of options written "(A) … (B) …", when they run A, B, C, … (at least two); else ()."""
    letters: list[str] = []
    for m in _OPTION.finditer(text):
        letter = m.group(1)
        if ord(letter) - ord("A") == len(letters):
            letters.append(letter)
    return tuple(letters) if len(letters) >= 2 else ()
