"""Parameter-compute of an answer: sum over the model calls made for it of (model parameters x tokens processed,
prompt + output). The issue's compute unit, the one `experiments/bench_cascade.py` reports per part.

A results record written since this module exists carries its calls (`answer.calls`: model alias, prompt and
output tokens, as the engine counted them). Older records (the claim-1 runs) do not; `estimated_calls` rebuilds
each call's request from the record and the run's config with the runtime's own prompt builders and counts its
tokens with the model's tokenizer. `tests/test_compute.py` checks the estimate against the engine's count on
SmolLM2. The estimate covers the systems whose calls a record determines: `Monolithic` (one call, the whole query)
and `Composed` where no planner model wrote the split (numbered questions: meqa) and the aggregator joins.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

from compiler.build import RoutedSubQuery, node_id, subquery_node
from compiler.choices import option_letters
from compllm.experts import experts_from_config
from compllm.runtime.prompts import subquery_request

#: messages -> number of prompt tokens (the chat template applied, generation prompt added); text -> tokens
CountPrompt = Callable[[Sequence[Mapping[str, str]]], int]
CountText = Callable[[str], int]


class NotEstimable(ValueError):
    """The record's calls cannot be rebuilt from it (a planner model wrote the split, or a model aggregated)."""


def call(model: str, prompt_tokens: int, output_tokens: int) -> dict[str, Any]:
    return {"model": model, "prompt_tokens": int(prompt_tokens), "output_tokens": int(output_tokens)}


def estimated_calls(record: Mapping[str, Any], config: Mapping[str, Any], count_prompt: Mapping[str, CountPrompt],
                    count_text: Mapping[str, CountText]) -> list[dict[str, Any]]:
    """The calls the record's answer made, rebuilt. `count_prompt` / `count_text` by model alias."""
    system, answer = config["system"], record["answer"]
    if system["_target_"].endswith("Monolithic"):
        if system.get("knowledge"):
            raise NotEstimable("the retrieval control's passages are not in the record")
        alias = system.get("model", "default")
        messages = [{"role": "system", "content": system["system_prompt"]}, {"role": "user", "content": record["query"]}]
        out = count_text[alias](answer["final_answer"])
        cap = int(system.get("max_new_tokens", 256))
        return [call(alias, count_prompt[alias](messages), min(out + 1, cap))]  # + the end-of-turn token
    if answer.get("decomposition", {}).get("format") not in ("enumerated",):
        raise NotEstimable(f"split {answer.get('decomposition', {}).get('format')!r}: a planner call's tokens are not "
                           "in the record")
    if config.get("aggregator", {}).get("mode", "join") != "join":
        raise NotEstimable("a model aggregator's prompt is not in the record")
    experts = experts_from_config(config["experts"])
    subs = answer["subqueries"]
    if any(sq.get("status") != "ok" or experts[sq["expert"]].knowledge is not None for sq in subs):
        raise NotEstimable("a part without an answer, or one that read passages (not in the record)")
    detect_choices = bool(config.get("decomposer", {}).get("detect_choices", True))
    answers = {node_id("q", i): sq["answer"] for i, sq in enumerate(subs, start=1)}
    calls = []
    for i, sq in enumerate(subs, start=1):  # each part's request rebuilt as the runtime builds it
        kind = "choice" if detect_choices and option_letters(sq["text"]) else "text"  # as the decomposer types it
        node = subquery_node("q", RoutedSubQuery(i, sq["text"], tuple(sq["depends_on"]), sq["expert"], kind))
        expert = experts[sq["expert"]]
        request = subquery_request(node, expert, answers, int(config.get("max_answer_chars", 400)))
        out = 1 if request.choices else min(count_text[expert.model](sq["answer"]) + 1, request.max_new_tokens)
        calls.append(call(expert.model, count_prompt[expert.model](request.messages), out))
    return calls


def calls_of(record: Mapping[str, Any]) -> list[dict[str, Any]] | None:
    """The calls the engine counted for this record, or None for a record written before they were kept."""
    calls = record.get("answer", {}).get("calls")
    return None if calls is None else list(calls)


def param_compute(calls: Sequence[Mapping[str, Any]], params: Mapping[str, int]) -> int:
    """Sum of parameters x (prompt + output tokens); `params` by model alias."""
    return sum(params[c["model"]] * (c["prompt_tokens"] + c["output_tokens"]) for c in calls)


def hf_counters(path: str) -> tuple[CountPrompt, CountText]:
    """Token counters of the HF model at `path`, counting as `compllm.backends.hf` does (the chat template rendered
    to text with the generation prompt, then tokenized without special tokens added)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)

    def count_prompt(messages: Sequence[Mapping[str, str]]) -> int:
        text = tok.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
        return len(tok(text, add_special_tokens=False)["input_ids"])

    def count_text(text: str) -> int:
        return len(tok(text, add_special_tokens=False)["input_ids"])

    return count_prompt, count_text
