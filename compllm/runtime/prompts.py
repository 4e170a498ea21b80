"""Turn IR nodes into chat requests. Parent answers enter prompts delimited and length-capped.

Every text that came from a model (answers, the decomposer's sub-questions) or a user (the query) is
neutralised before it enters a prompt: chat-template control tokens lose their angle brackets (tokenizers
would otherwise read `<|im_start|>system` in an answer as a real new turn), and answers are put on one line
with their own « » turned into ‹ ›, so no answer can close its quote or start a line that looks like one
of the prompt's own headers ("Question:", "Facts from ...").
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Collection, List, Mapping, Sequence

from omegaconf import MISSING

from compiler.build import PASSAGES_LABEL, FinalAnswer
from compiler.choices import option_letters
from compiler.ir import REFERENCE, AnswerType, Node
from compllm.backends.base import GenerationRequest
from compllm.backends.sanitize import neutralise, one_line
from compllm.experts import Expert

OPEN, CLOSE = "«", "»"


def quote(answer: str, max_chars: int) -> str:
    """Delimit an earlier model's answer so it reads as data, and cap it so it cannot crowd the prompt.

    The answer's own « » become ‹ ›, so it cannot close its quote early; whitespace (line breaks included)
    collapses to single spaces, so it cannot start a fake "Question:" line; control tokens are neutralised.
    """
    max_chars = max(int(max_chars), 1)
    answer = neutralise(" ".join(answer.split())).replace(OPEN, "‹").replace(CLOSE, "›")  # collapse first: "<|\n|>"
    if len(answer) > max_chars:
        answer = answer[: max_chars - 1].rstrip() + "…"
    return f"«{answer}»"


def fill(node: Node, answers: Mapping[str, str], max_answer_chars: int) -> str:
    """The node's template (neutralised, on one line) with each `{#k}` replaced by its parent's quoted answer."""
    parts = REFERENCE.split(node.template)  # even positions: text; odd positions: reference labels
    return "".join(quote(answers.get(node.inputs[part], ""), max_answer_chars) if i % 2 else one_line(part)
                   for i, part in enumerate(parts))


def passages_block(passages: Sequence[Mapping[str, Any]], max_chars: int) -> str:
    """Retrieved passages as prompt text: numbered, each quoted and capped like a parent's answer."""
    lines = [f"[{i}] " + quote(f"{p.get('title', '')}: {p.get('text', '')}", max_chars)
             for i, p in enumerate(passages, start=1)]
    return "Passages from the knowledge source (they may not hold the answer):\n" + "\n".join(lines)


def subquery_request(node: Node, expert: Expert, answers: Mapping[str, str], max_answer_chars: int = 400,
                     passages: Sequence[Mapping[str, Any]] | None = None) -> GenerationRequest:
    """`passages`: what the node's retrieve parent found (None: it has none), quoted before its question."""
    question = fill(node, answers, max_answer_chars)
    context = [
        f"{label}: {quote(answers.get(parent, ''), max_answer_chars)}" for label, parent in node.inputs.items()
        if label != PASSAGES_LABEL
    ]
    user = question if not context else "Facts from earlier steps:\n" + "\n".join(context) + "\n\nQuestion: " + question
    if passages is not None:
        cap = expert.knowledge.max_passage_chars if expert.knowledge is not None else max_answer_chars
        user = passages_block(passages, cap) + "\n\n" + (user if context else "Question: " + question)
    choices = option_letters(question) if node.answer_type is AnswerType.CHOICE else ()
    return GenerationRequest(
        ({"role": "system", "content": expert.system_prompt}, {"role": "user", "content": user}),
        1 if choices else expert.max_new_tokens,
        tuple(expert.stop),
        choices,
    )


@dataclass
class Aggregator:
    """How a query's final answer is made from the experts' answers.

    `mode=join` (default): the answers of the parts nothing else reads, unchanged, one per line: no model call,
    so nothing is invented or dropped. `mode=model`: the aggregator model writes it from every part's answer
    (the paper's aggregator); a query of one part (`skip_single`) or of numbered questions is still joined.
    Which applies is decided when the graph is built (`compiler.build.FinalAnswer`), so the plan knows it.
    Also the structured-config schema of `aggregator` (one dataclass per concept).
    """

    model: str = "default"
    system_prompt: str = MISSING
    mode: FinalAnswer = FinalAnswer.join
    max_new_tokens: int = 160
    max_answer_chars: int = 600
    skip_single: bool = True  # mode=model: one sub-query's answer *is* the final answer, no extra model call
    stop: List[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.mode = FinalAnswer(self.mode)

    def request(self, query: str, parts: Sequence[tuple[str, str, str]], chained: bool = False,
                steps: Collection[str] | None = None) -> GenerationRequest:
        """`parts` = (label, sub-question with its parents' answers filled in, answer or a note that it is
        missing). `chained`: some part used an earlier part's answer. `steps`: the labels of the parts another
        part read (a chain's earlier steps); None = found from `parts`: a part whose answer a later part's
        question quotes (as `fill` quoted it).

        The final answer restates the answers the user asked for, one numbered line each, and nothing else; a
        chain is answered by its last step's answer in one sentence, its earlier steps given as background only.
        Measured on Qwen2.5-Coder-0.5B (experiments/bench_answers.py): shown each sub-question beside its answer,
        it repeated them ("Part 1: <sub-question> <answer>"); told to restate each "fact" in a sentence, it
        labelled its lines ("Fact 1:", "Sentence 1:") and dropped clauses; asked for a numbered list of the answers
        with all their words, no titles and no labels, it mostly copies them (it still "corrects" a bare wrong
        number now and then: "28" for 7 x 8 became "7 times 8 is 56").
        """
        if steps is None:
            heads = [quote(answer, self.max_answer_chars)[:41].rstrip(CLOSE) for _, _, answer in parts]
            steps = {label for i, (label, _, answer) in enumerate(parts) if chained and answer.strip()
                     and any(heads[i] in question for _, question, _ in parts[i + 1:])}
        final = [quote(answer, self.max_answer_chars) for label, _, answer in parts if label not in steps]
        background = "".join(f"- {question} {quote(answer, self.max_answer_chars)}\n"
                             for label, question, answer in parts if label in steps)
        if background and len(final) == 1:
            facts = f"Facts found on the way:\n{background}\nAnswer from the last step:\n- {final[0]}"
            task = ("Write one sentence that gives the answer from the last step, keeping its names and numbers "
                    "exactly as given, even if you think they are wrong. Nothing else.")
        else:
            facts = (f"Facts found on the way:\n{background}\n" if background else "") + \
                f"Facts from experts ({len(final)} parts):\n" + "\n".join(f"- {answer}" for answer in final)
            numbers = ", ".join(f"{k}." for k in range(1, len(final) + 1))
            task = (f"Write {len(final)} sentences, one per part, as a numbered list ({numbers}): sentence k gives "
                    "answer k with all of its words, names and numbers, even if you think it is wrong; a bare answer "
                    "such as a number becomes a short sentence that states it. No titles, no labels, nothing else.")
        user = f"Question: {one_line(query)}\n\n{facts}\n\n{task}"
        return GenerationRequest(
            ({"role": "system", "content": self.system_prompt}, {"role": "user", "content": user}),
            self.max_new_tokens,
            tuple(self.stop),
        )

