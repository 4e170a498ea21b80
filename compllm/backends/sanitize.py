"""What may enter a chat message from outside the prompt's author: model output and user text.

Tokenizers read special tokens inside message content as real ones, so `<|im_start|>system` in an answer
(or a query) would open a new turn of the chat template. These helpers turn such tokens into harmless
look-alikes, for every backend and every prompt builder (runtime.prompts, frontend.decomposer).
"""
from __future__ import annotations

import re

# `<|im_start|>`, `<|endoftext|>`, `<｜end▁of▁sentence｜>`; `<s>`, `</s>`, `<start_of_turn>`, `<eos>`; `[INST]`, `<<SYS>>`.
_CONTROL = re.compile(
    r"<\s*[|\uff5c][^<>\n]{0,64}?[|\uff5c]\s*>"
    r"|</?\s*(?:s|bos|eos|pad|unk|start_of_turn|end_of_turn|start_header_id|end_header_id|eot_id)\s*>"
    r"|\[/?\s*INST\s*\]|<</?\s*SYS\s*>>",
    re.I,
)
_BRACKETS = re.compile(r"[<>|\uff5c\[\]]")
_LINE_BREAKS = re.compile(r"[\n\r\v\f\x1c-\x1e\x85\u2028\u2029]+")  # everything str.splitlines() splits on


def neutralise(text: str) -> str:
    """Chat-template control tokens as harmless look-alikes: `<|im_start|>` -> `‹im_start›`, `</s>` -> `‹/s›`."""
    text = _CONTROL.sub(lambda m: f"‹{_BRACKETS.sub('', m.group(0)).strip()}›", text)
    # A nested "<|<||>|>" leaves "<|‹›|>" behind: no "<|" may remain to open a token-like span at all.
    return text.replace("<|", "‹|").replace("<\uff5c", "‹\uff5c")


def one_line(text: str) -> str:
    """Neutralised and without line breaks, so inserted text cannot start a line of the prompt's own."""
    return neutralise(_LINE_BREAKS.sub(" ", text))  # breaks first, so "<|\n|>" cannot become "<| |>" afterwards
