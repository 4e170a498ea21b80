"""Turn IR nodes into chat requests. Parent answers enter prompts delimited and length-capped.

Every text that came from a model (answers, the decomposer's sub-questions) or a user (the query) is
neutralised before it enters a prompt: chat-template control tokens lose their angle brackets (tokenizers
would otherwise read `<|im_start|>system` in an answer as a real new turn), and answers are put on one line
with their own « » turned into ‹ ›, so no answer can close its quote or start a line that looks like one
of the prompt's own headers ("Question:", "Facts from ...").
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Mapping, Sequence

from omegaconf import MISSING

from compiler.build import FinalAnswer
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


def subquery_request(node: Node, expert: Expert, answers: Mapping[str, str], max_answer_chars: int = 400) -> GenerationRequest:
    question = fill(node, answers, max_answer_chars)
    context = [
        f"{label}: {quote(answers.get(parent, ''), max_answer_chars)}" for label, parent in node.inputs.items()
    ]
    user = question if not context else "Facts from earlier steps:\n" + "\n".join(context) + "\n\nQuestion: " + question
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

    def request(self, query: str, parts: Sequence[tuple[str, str, str]], chained: bool = False) -> GenerationRequest:
        """`parts` = (label, sub-question, answer or a note that it is missing). `chained`: some part used an
        earlier part's answer, so the parts are steps towards one answer, not separate questions."""
        # Measured on Qwen2.5-Coder-0.5B: question, numbered facts, then "write N sentences, one per part"
        # covers every part; free-form "answer using these facts" rambled on the first part and dropped the rest.
        facts = "\n".join(f"- {question} {quote(answer, self.max_answer_chars)}" for _, question, answer in parts)
        query = one_line(query)
        task = ("These facts are steps towards one answer. Answer the question in one or two sentences, starting "
                "with the direct answer (yes or no, a name, a number)." if chained
                else f"Write {len(parts)} sentences, one per part, in the order the parts are asked, and nothing else.")
        user = f"Question: {query}\n\nFacts from experts ({len(parts)} parts):\n{facts}\n\n{task}"
        return GenerationRequest(
            ({"role": "system", "content": self.system_prompt}, {"role": "user", "content": user}),
            self.max_new_tokens,
            tuple(self.stop),
        )
