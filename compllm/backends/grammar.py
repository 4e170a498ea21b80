"""JSON-schema-constrained greedy decoding for the in-process hf backend, with xgrammar (what vLLM and SGLang use).

`SchemaGrammars` belongs to one loaded model (one tokenizer): it compiles each `GenerationRequest.json_schema` once
into an xgrammar grammar over that tokenizer's vocabulary (padded to the model's logits width: Qwen's 151,936) and
hands each constrained row its own `RowGrammar` (a `GrammarMatcher`). A row picks its token like llama.cpp's grammar
sampler is driven here (`compllm/backends/llamacpp.py`): the unconstrained greedy token when the grammar accepts it,
else the greedy token of the logits masked to what the grammar allows; both give the masked argmax, and the full
vocabulary is masked only on the steps where the model strays. Rows without a schema are never touched.

xgrammar is an optional engine dependency (`requirements/grammar.txt`, installed by `make setup`): without it a
schema is asked for but not enforced, `Generation.constrained` stays False and the decomposer records `unenforced`.
"""
from __future__ import annotations

import logging
import threading
from typing import Any, Iterable

from compllm.backends.base import BackendError

log = logging.getLogger(__name__)

INSTALL = "pip install --no-deps -r requirements/grammar.txt (make setup does)"


def load_xgrammar() -> Any | None:
    """The xgrammar module, or None when it is not installed (or cannot load here)."""
    try:
        import xgrammar
    except ImportError:
        return None
    return xgrammar


class RowGrammar:
    """One row's grammar state: which tokens it allows next, advanced by every token the row emits."""

    def __init__(self, xgr: Any, compiled: Any, vocab_size: int):
        self._xgr = xgr
        self.matcher = xgr.GrammarMatcher(compiled)
        self.vocab_size = vocab_size
        self.masked_steps = 0  # steps on which the greedy token broke the grammar and the vocabulary was masked

    def pick(self, best: int, logits) -> int:
        """The greedy token the grammar allows, given the unconstrained greedy token `best` and the row's logits
        (1-D, left as they are); the token is accepted into the grammar's state."""
        if self.matcher.accept_token(best):
            return best
        xgr = self._xgr
        bitmask = xgr.allocate_token_bitmask(1, self.vocab_size)
        self.matcher.fill_next_token_bitmask(bitmask)
        masked = logits[None, :].clone()
        xgr.apply_token_bitmask_inplace(masked, bitmask.to(masked.device), vocab_size=self.vocab_size)
        token = int(masked[0].argmax())
        if masked[0, token] == float("-inf") or not self.matcher.accept_token(token):
            raise BackendError("the grammar of the request's json_schema allows no token here")
        self.masked_steps += 1
        return token

    @property
    def terminated(self) -> bool:
        """The grammar has accepted a stop token: nothing more may follow."""
        return bool(self.matcher.is_terminated())


class SchemaGrammars:
    """Compiled grammars for one tokenizer, one per schema text (compiled on first use, then reused)."""

    def __init__(self, name: str, tokenizer, vocab_size: int, stop_token_ids: Iterable[int]):
        self.name = name
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._stop_ids = sorted(set(stop_token_ids))
        self._compiler: Any | None = None
        self._compiled: dict[str, Any] = {}
        self._lock = threading.Lock()  # callers on several threads may compile at once
        self._warned = False

    def row(self, schema: str) -> RowGrammar | None:
        """A fresh grammar state for `schema`, or None (with one warning per model) when xgrammar is missing."""
        xgr = load_xgrammar()
        if xgr is None:
            if not self._warned:
                self._warned = True
                log.warning("model %r: xgrammar is not installed, so json_schema requests decode unconstrained "
                            "(Generation.constrained=False); to enforce them: %s", self.name, INSTALL)
            return None
        return RowGrammar(xgr, self.compiled(xgr, schema), self.vocab_size)

    def compiled(self, xgr: Any, schema: str) -> Any:
        with self._lock:
            if schema not in self._compiled:
                if self._compiler is None:
                    info = xgr.TokenizerInfo.from_huggingface(self._tokenizer, vocab_size=self.vocab_size,
                                                              stop_token_ids=self._stop_ids)
                    self._compiler = xgr.GrammarCompiler(info, max_threads=1)
                try:
                    # compact JSON with ", " and ": " (what the planner's few-shot examples show): no run of
                    # whitespace a small model could loop in
                    self._compiled[schema] = self._compiler.compile_json_schema(schema, any_whitespace=False)
                except Exception as exc:  # noqa: BLE001 - xgrammar raises RuntimeError/ValueError on bad schemas
                    raise BackendError(f"model {self.name!r}: cannot turn the request's json_schema into a grammar "
                                       f"({type(exc).__name__}: {exc})") from exc
            return self._compiled[schema]
