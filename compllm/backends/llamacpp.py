"""llama.cpp backend, in process: one GGUF run with llama-cpp-python's low-level API (`backend: llamacpp`).

Same contract as `HFModel.generate`: greedy, the rows of a call decoded together, each row leaving at its own end
of sequence / stop string / `max_new_tokens`, waiting rows joining as others finish (at most `max_live_rows` live,
admitted by `compiler.cost.admit_rows`), `choice` rows answered from their first-token logits over the option
letters, `cancel` checked before every `llama_decode`.

How it maps onto llama.cpp: one context (`llama_init_from_model`) whose KV cache holds `n_seq_max` sequences; every
row is its own sequence id (1..n_seq_max-1) with its own positions; a decode step is one `llama_batch` holding the
next token of every live row, with logits only for each row's last token; a finished row's KV is dropped with
`llama_memory_seq_rm`.

Prefix reuse (`compllm.backends.prefixes`): the KV of shared prompt prefixes is kept as sequence states
(`llama_state_seq_get_data`, host memory, least recently used dropped past `prefix_cache_mb`, which the plan
reserves) and restored into each row's own sequence (`llama_state_seq_set_data`, then `llama_memory_seq_rm` past the
tokens it shares), so only the rest of its prompt is prefilled. Which rows share what is found from the tokens (the
compiler knows the prefixes by expert, not by token: its `prefix` pass orders the rows and counts the saving). At the start of a call, every group of rows sharing a prefix of at least
`min_shared_tokens` (rows of one expert: its system prompt; the planner's instructions) that no saved state covers
gets its prefix computed once in sequence 0 and saved; a row that shares nothing with the call's other rows has its
own prompt saved after its prefill, so the next call sharing a prefix with it (the next planner call, the next call
of the same expert) reuses it. Several prefixes are kept at once (one per expert, the planner's, ...), across calls.
`Generation.cached_tokens` says, per row, how many of its prompt tokens it did not compute: the prefix tokens this
call computed count for the first row restoring them, so the rows' counts add up to
`stats.extra["prefill_tokens_reused"]`.

Batch invariance. llama.cpp's CPU kernels are not batch-invariant: which kernel computes a row, and so how its
sums round (amplified by the 8-bit quantized activations into different greedy tokens), depends on what else is in
the ubatch. Measured here (SmolLM2 Q4_1, Qwen2.5-0.5B Q4_K_M, AVX-512): a unified KV cache (attention sums over
cells wherever other rows left room: 3-6 of 6 answers changed with the batch), flash attention (kernel chosen by
query count and KV length), repacked weights (4-row gemm vs gemv), the tiled K-quant matmul (used from 8 rows on),
and llamafile's sgemm vs ggml's vec_dot (2+ rows vs 1). So by default (`LlamaCppSettings`):

* one KV stream per sequence (`kv_unified: false`): a row's cells sit at the offsets they have when it runs alone;
* no flash attention, no repacking, no tiled matmul;
* each row's prompt is prefilled in its own `llama_decode`, in pieces of at least 2 tokens, and decode steps carry
  1 token per row: every token is computed by the same kernels whatever the batch, `max_live_rows`, threads or
  prefix reuse. Batching changes speed, never answers, as the project requires (tests/test_llamacpp.py checks
  SmolLM2 and Qwen2.5's 8-row batches against batch 1).

Costs of the default: each sequence owns `n_ctx` cells, a reused prefix is copied (its cells only), a decode
step whose live rows do not have consecutive sequence ids runs as several ubatches (llama.cpp's split_equal), and
K-quant prefill is ~30% slower without the tiled matmul. `kv_unified: true` is llama-server's layout: newcomers'
prompts share the decode step's `llama_decode`.

Prompts: the GGUF's own chat template (the one the `hf` backend's converted tokenizer carries) rendered with jinja2
as transformers' `apply_chat_template(..., add_generation_prompt=True)` does (llama-cpp-python's
`Jinja2ChatFormatter`, which mirrors transformers' jinja environment), then tokenized by llama.cpp with special
tokens parsed and none added: the same prompt ids as the `hf` backend (checked in tests/test_llamacpp.py).
llama.cpp's `llama_chat_apply_template` is not used: it is no jinja engine and drops the default system prompt
that SmolLM2's and Qwen2.5's templates insert.

Constrained decoding: a request with a `json_schema` decodes under llama.cpp's grammar sampler, the schema turned
into GBNF by llama-cpp-python's own converter (`llama_grammar.json_schema_to_gbnf`, cached per schema). The greedy
token is checked against the grammar first (one candidate); only when the grammar rejects it is the whole vocabulary
masked and the best allowed token taken, as llama.cpp's common sampler does: the same token as masking first,
at a fraction of the cost on a 151k-token vocabulary.
"""
from __future__ import annotations

import ctypes
import logging
import os
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Optional, Sequence

from compiler.cost import admit_rows
from compllm.backends.base import (BackendError, choice_confidence, text_confidence, Generation, GenerationCancelled, GenerationRequest, ModelStats,
                                   OnText)
from compllm.backends.prefixes import PrefixStore, shared_groups

log = logging.getLogger(__name__)

PREFIX_SEQ = 0  # the sequence a shared prefix is computed in before it is saved; rows use 1..n_seq_max-1
MIN_PIECE = 2  # prompt tokens are computed at least 2 per sequence per llama_decode (see the module docstring)


@dataclass
class LlamaCppSettings:
    """`models.<alias>.llamacpp`: how the llama.cpp backend runs its one context."""

    # Threads for decode steps and for prompt batches. On a shared, oversubscribed CPU one thread can be far
    # faster than two (ggml's threads meet at a barrier after every op; /work/shared/ENGINES.md measured 8-10x).
    threads: int = 1
    threads_batch: Optional[int] = None  # None: same as threads
    n_ctx: int = 2048  # KV cells per sequence: the longest prompt + answer one row may have
    n_seq_max: int = 9  # sequences: 1 for the cached prefix + at most n_seq_max-1 rows decoding at once
    n_batch: int = 512  # most tokens per llama_decode; longer prompts are split (cancel is checked in between)
    prefix_cache: bool = True  # keep and reuse the KV of shared prompt prefixes, across rows and calls
    # Host memory for the saved prefix states (least recently used dropped first); the plan reserves all of it beside
    # the model (`calibration.build.engine_cost`). 64 MiB: ~5,400 tokens of Qwen2.5-0.5B's 12 KiB/token KV.
    prefix_cache_mb: int = 64
    min_shared_tokens: int = 8  # rows sharing at least this many prompt tokens get their prefix computed once
    # Faster kernels that make a row's tokens depend on the batch it runs in (see the module docstring); all off by
    # default, so that batching changes speed, never answers:
    kv_unified: bool = False  # one shared KV cache (less memory, no prefix copies)
    flash_attn: bool = False  # ggml's CPU flash attention (kernel chosen by query count and KV length)
    repack: bool = False  # weights repacked for ggml's gemm/gemv kernels (llama_model_params.use_extra_bufts)
    # ggml's tiled K-quant matmul for 8+ rows (GGML_CPU_TILED_MM): prompt prefill ~30% faster on Q4_K_M, but 8-row
    # decode steps round differently from smaller ones. An environment variable ggml reads once per process: the
    # first llama.cpp model to run decides it for every later one (a differing setting is logged and ignored).
    tiled_matmul: bool = False


def _check(settings: LlamaCppSettings, name: str) -> None:
    problems = []
    if settings.threads < 1 or (settings.threads_batch is not None and settings.threads_batch < 1):
        problems.append("threads and threads_batch must be >= 1")
    if settings.n_seq_max < 2:
        problems.append("n_seq_max must be >= 2 (one sequence holds the cached prefix)")
    if settings.prefix_cache_mb < 0 or settings.min_shared_tokens < MIN_PIECE:
        problems.append(f"prefix_cache_mb must be >= 0 and min_shared_tokens >= {MIN_PIECE}")
    if settings.n_ctx < 16:
        problems.append("n_ctx must be >= 16")
    if settings.n_batch < max(32, settings.n_seq_max):  # llama.cpp aborts the process when outputs overflow
        problems.append("n_batch must be >= 32 and >= n_seq_max")
    if problems:
        raise BackendError(f"model {name!r}: llamacpp settings: {'; '.join(problems)}")


_backend_ready = False
_backend_lock = threading.Lock()


def _llama():
    """The llama_cpp module, with the ggml backend initialised once and its C log quiet unless asked for."""
    global _backend_ready
    try:
        import llama_cpp
    except ImportError as exc:
        raise BackendError("backend llamacpp needs llama-cpp-python: `make setup-llamacpp` "
                           f"(see requirements/llamacpp.txt): {exc}") from exc
    with _backend_lock:
        if not _backend_ready:
            lib_log = logging.getLogger("llama-cpp-python")  # llama_cpp's C log callback prints what this allows
            if lib_log.level == logging.NOTSET:
                lib_log.setLevel(logging.ERROR)
            llama_cpp.llama_backend_init()
            _backend_ready = True
    return llama_cpp


_TILED_ENV = "GGML_CPU_TILED_MM"


def _set_tiled_matmul(enabled: bool, name: str) -> None:
    """Set GGML_CPU_TILED_MM before ggml first reads it (at the first matmul), unless the process already set it."""
    want = "1" if enabled else "0"
    have = os.environ.get(_TILED_ENV)
    if have is None:
        os.environ[_TILED_ENV] = want
    elif have != want:
        log.warning("model %r: llamacpp.tiled_matmul=%s ignored: %s=%s is already set for this process", name,
                    enabled, _TILED_ENV, have)


def _free(llama_cpp, handles: dict) -> None:
    """Free the batch, context and model (a weakref.finalize callback: it must not reference the model object)."""
    if handles.get("batch") is not None:
        llama_cpp.llama_batch_free(handles.pop("batch"))
    if handles.get("ctx"):
        llama_cpp.llama_free(handles.pop("ctx"))
    if handles.get("model"):
        llama_cpp.llama_model_free(handles.pop("model"))


class _Row:
    __slots__ = ("index", "request", "ids", "seq", "pos", "reused", "cached", "tokens", "finished", "next", "pick",
                 "cells", "entry", "grammar", "next_logprob", "logprobs", "choice")

    def __init__(self, index: int, request: GenerationRequest, ids: list[int]):
        self.index, self.request, self.ids = index, request, ids
        self.seq = -1
        self.pos = 0  # next position to feed
        self.reused = 0  # prompt tokens restored from a saved prefix
        self.entry: tuple[int, ...] | None = None  # the saved prefix they come from
        self.cached = 0  # of those, the ones this call did not compute (what Generation.cached_tokens reports)
        self.tokens: list[int] = []
        self.finished = False  # by end of sequence or stop string (else: length)
        self.next: int | None = None  # greedy pick from the last logits
        self.pick: int | None = None  # a choice row's best option token
        self.cells = 0  # KV cells reserved for this row's worst case beyond what it reuses
        self.grammar = None  # llama_sampler_p of the row's json_schema, if it has one
        self.next_logprob = 0.0  # log-prob of `next` under the last logits
        self.logprobs: list[float] = []  # of the answer tokens taken (confidence)
        self.choice: tuple[float, tuple[float, ...]] | None = None  # a choice row: (margin, option probabilities)

    @property
    def needs(self) -> int:
        """Cells this row may fill: its prompt and, unless it is a choice, up to max_new_tokens answer tokens."""
        return len(self.ids) + (0 if self.request.choices else self.request.max_new_tokens)


class LlamaCppModel:
    """A GGUF loaded once with llama.cpp and shared by every expert naming it."""

    def __init__(self, name: str, path: str, settings: LlamaCppSettings | None = None):
        self.name = name
        self.path = str(path)
        self.settings = settings = settings or LlamaCppSettings()
        _check(settings, name)
        self.stats = ModelStats()
        self.stats.extra.update(prefill_tokens_computed=0, prefill_tokens_reused=0)
        self._lock = threading.Lock()  # one generate at a time per model copy
        self._choice_ids: dict[tuple[str, ...], list[int]] = {}
        self._gbnf: dict[str, str] = {}  # json_schema text -> GBNF
        llama_cpp = self._l = _llama()
        start = time.perf_counter()
        self._handles: dict = {}
        self._finalizer = weakref.finalize(self, _free, llama_cpp, self._handles)
        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = 0
        mparams.use_extra_bufts = settings.repack
        _set_tiled_matmul(settings.tiled_matmul, name)
        model = llama_cpp.llama_model_load_from_file(self.path.encode(), mparams)
        if not model:
            raise BackendError(f"model {name!r}: llama.cpp cannot load {self.path!r} (not a GGUF it supports?)")
        self._handles["model"] = self._model = model
        self._n_seq = min(settings.n_seq_max, llama_cpp.llama_max_parallel_sequences())
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = settings.n_ctx * self._n_seq  # unified or not: n_ctx cells per sequence on average
        cparams.n_batch = cparams.n_ubatch = settings.n_batch  # a llama_decode is one ubatch per sequence set
        cparams.n_seq_max = self._n_seq
        cparams.kv_unified = settings.kv_unified
        cparams.n_threads = settings.threads
        cparams.n_threads_batch = settings.threads_batch or settings.threads
        cparams.no_perf = True
        cparams.flash_attn_type = (llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if settings.flash_attn
                                   else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        ctx = llama_cpp.llama_init_from_model(model, cparams)
        if not ctx:
            raise BackendError(f"model {name!r}: llama.cpp cannot create a context of {cparams.n_ctx} cells "
                               f"({settings.n_seq_max} sequences): out of memory?")
        self._handles["ctx"] = self._ctx = ctx
        self._n_ctx = llama_cpp.llama_n_ctx(ctx)
        self._seq_cells = llama_cpp.llama_n_ctx_seq(ctx)  # one sequence's limit (n_ctx/n_seq_max unless unified)
        self._cap = settings.n_batch
        self._handles["batch"] = self._batch = llama_cpp.llama_batch_init(self._cap, 0, 1)
        self._mem = llama_cpp.llama_get_memory(ctx)
        self._vocab = llama_cpp.llama_model_get_vocab(model)
        self._n_vocab = llama_cpp.llama_vocab_n_tokens(self._vocab)
        self._prefixes = PrefixStore(settings.prefix_cache_mb << 20)  # saved KV states of shared prefixes
        self._formatter = self._chat_formatter()
        self.stats.load_seconds = time.perf_counter() - start
        log.info("loaded %s from %s with llama.cpp in %.1fs (%d threads, %d sequences x %d cells, %s KV)", name,
                 self.path, self.stats.load_seconds, settings.threads, self._n_seq, self._seq_cells,
                 "unified" if settings.kv_unified else "per-sequence")

    # ------------------------------------------------------------------ model facts

    @property
    def weight_bytes(self) -> int:
        """Bytes of the model's tensors as llama.cpp holds them (the quantized GGUF tensors)."""
        return int(self._l.llama_model_size(self._model))

    @property
    def kv_bytes_per_token(self) -> int:
        """f16 K and V in every layer: what one KV cell costs."""
        L, m = self._l, self._model
        head_dim = L.llama_model_n_embd(m) // max(1, L.llama_model_n_head(m))
        return 2 * 2 * L.llama_model_n_layer(m) * L.llama_model_n_head_kv(m) * head_dim

    @property
    def kv_bytes(self) -> int:
        """The KV cache, allocated in full when the model loads (n_ctx * n_seq_max cells)."""
        return self.kv_bytes_per_token * self._n_ctx

    @property
    def cached_prefix_tokens(self) -> int:
        """Tokens whose KV the saved prefix states hold (summed over prefixes)."""
        return self._prefixes.tokens

    @property
    def cached_prefixes(self) -> int:
        return len(self._prefixes)

    def clear_prefixes(self) -> None:
        """Forget every saved prefix (benchmarks start each measured run with nothing saved)."""
        with self._lock:
            self._prefixes.clear()

    @property
    def resident_bytes(self) -> int:
        """What the loaded model holds however many rows run: its tensors and its whole (preallocated) KV cache."""
        return self.weight_bytes + self.kv_bytes

    def calibrate(self, prompt_tokens: int = 256, new_tokens: int = 32, repeats: int = 3,
                  batch_sizes: Sequence[int] = (1, 2, 3, 4, 6, 8)):
        """This backend's `compiler.cost.ModelCost`, measured like `compllm.calibration` measures the hf
        backend (minimum over `repeats` rounds after a warm-up; prefill s/token at batch 1, decode step by batch).

        Memory: the KV cache is allocated in full at load, so `weight_bytes` is `resident_bytes` and
        `kv_bytes_per_token` is 0 (a bigger batch takes no more memory)."""
        from compiler.cost import ModelCost

        token = self.tokenize(" the", special=False)[0]
        sizes = [b for b in batch_sizes if b <= self._n_seq - 1]
        prompt_tokens = min(prompt_tokens, self._seq_cells - new_tokens - 1)

        def timed(batch: int, length: int) -> tuple[float, float]:
            rows = [_Row(i, GenerationRequest(()), [token] * length) for i in range(batch)]
            for i, row in enumerate(rows):
                row.seq = i + 1
            try:
                start = time.perf_counter()
                self._run([(row, row.ids) for row in rows], None)
                prefill = time.perf_counter() - start
                start = time.perf_counter()
                for _ in range(new_tokens):
                    self._run([(row, [row.next]) for row in rows], None)
                return prefill, time.perf_counter() - start
            finally:
                self._clear_rows(keep_prefix=True)

        prefill, decode, steps = [], [], {str(b): [] for b in sizes}
        with self._lock:
            for round_ in range(repeats + 1):  # round 0 warms up
                p, d = timed(1, prompt_tokens)
                if round_:
                    prefill.append(p / prompt_tokens)
                    decode.append(d / new_tokens)
                for b in sizes:
                    _, d = timed(b, 16)
                    if round_:
                        steps[str(b)].append(d / new_tokens)
        return ModelCost(weight_bytes=self.resident_bytes, kv_bytes_per_token=0, prefill_s_per_token=min(prefill),
                         decode_s_per_token=min(decode), load_s=self.stats.load_seconds,
                         decode_step_s_by_batch={b: min(v) for b, v in steps.items()})

    def close(self) -> None:
        """Free the context and the model now (also done when the object is garbage-collected)."""
        self._finalizer()

    # ------------------------------------------------------------------ text

    def _chat_formatter(self):
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        template = self._l.llama_model_chat_template(self._model, None)
        if not template:
            raise BackendError(f"model {self.name!r} at {self.path!r} has no chat template; use an instruct model")
        bos = self._piece(self._l.llama_vocab_bos(self._vocab))
        eos = self._piece(self._l.llama_vocab_eos(self._vocab))
        return Jinja2ChatFormatter(template.decode("utf-8"), eos_token=eos, bos_token=bos, add_generation_prompt=True)

    def render(self, request: GenerationRequest) -> str:
        return self._formatter(messages=[dict(m) for m in request.messages]).prompt

    def tokenize(self, text: str, special: bool = True) -> list[int]:
        """Token ids of `text`: special tokens parsed (`special`), none added, as the hf backend tokenizes."""
        data = text.encode("utf-8")
        cap = len(data) + 8
        while True:
            buf = (self._l.llama_token * cap)()
            n = self._l.llama_tokenize(self._vocab, data, len(data), buf, cap, False, special)
            if n >= 0:
                return list(buf[:n])
            cap = -n

    def detokenize(self, ids: Sequence[int]) -> str:
        """Text of `ids` without special tokens (like `tokenizer.decode(..., skip_special_tokens=True)`)."""
        if not ids:
            return ""
        arr = (self._l.llama_token * len(ids))(*ids)
        cap = 8 * len(ids) + 16
        while True:
            buf = ctypes.create_string_buffer(cap)
            n = self._l.llama_detokenize(self._vocab, arr, len(ids), buf, cap, False, False)
            if n >= 0:
                return buf.raw[:n].decode("utf-8", errors="replace")
            cap = -n

    def _piece(self, token: int) -> str:
        buf = ctypes.create_string_buffer(64)
        n = self._l.llama_token_to_piece(self._vocab, token, buf, 64, 0, True)
        return buf.raw[:max(n, 0)].decode("utf-8", errors="replace")

    def _choice_token_ids(self, choices: tuple[str, ...]) -> list[int]:
        """The first token of each choice (option letters are one token in every tokenizer we ship)."""
        if choices not in self._choice_ids:
            ids = [self.tokenize(c, special=False)[0] for c in choices]
            if len(set(ids)) != len(ids):
                raise BackendError(f"choices {choices} do not start with distinct tokens")
            self._choice_ids[choices] = ids
        return self._choice_ids[choices]

    # ------------------------------------------------------------------ generate

    def generate(self, requests: Sequence[GenerationRequest], max_live_rows: int | None = None,
                 cancel: threading.Event | None = None, on_text: OnText | None = None) -> list[Generation]:
        """Greedy answers for `requests`, decoded together; at most `max_live_rows` rows live at once (None: all,
        capped by n_seq_max-1). `cancel` is checked before every `llama_decode`; `on_text(row, text so far)` as
        each row's text grows."""
        if not requests:
            return []
        slots = len(requests) if max_live_rows is None else max(1, min(max_live_rows, len(requests)))
        slots = min(slots, self._n_seq - 1)
        rows = [_Row(i, r, self.tokenize(self.render(r))) for i, r in enumerate(requests)]
        limit = self._n_ctx if self.settings.kv_unified else self._seq_cells
        for row in rows:
            if row.needs > limit:
                raise BackendError(
                    f"model {self.name!r}: request {row.index} needs {len(row.ids)} prompt + "
                    f"{row.request.max_new_tokens} new tokens, more than the {limit} KV cells a sequence has; "
                    f"raise models.<alias>.llamacpp.n_ctx (now {self.settings.n_ctx})")
        with self._lock:
            start = time.perf_counter()
            ok = False
            try:
                for row in rows:
                    if row.request.json_schema and not row.request.choices:
                        row.grammar = self._grammar_sampler(row.request.json_schema)
                computed = self._decode(rows, slots, cancel, on_text)
                ok = True
            finally:
                self._clear_rows(keep_prefix=ok)
                for row in rows:
                    if row.grammar is not None:
                        self._l.llama_sampler_free(row.grammar)
                        row.grammar = None
            seconds = time.perf_counter() - start
        results = []
        for row in rows:
            text, stopped = _cut_at_stop(self.detokenize(row.tokens), row.request.stop)
            confidence, probs = row.choice if row.choice is not None else (text_confidence(row.logprobs), ())
            results.append(Generation(text=text.strip(), prompt_tokens=len(row.ids), output_tokens=len(row.tokens),
                                      seconds=seconds, finish_reason="stop" if (row.finished or stopped) else "length",
                                      batch_size=len(requests), cached_tokens=row.cached,
                                      constrained=bool(row.request.json_schema and not row.request.choices),
                                      confidence=confidence, choice_probs=probs))
            self.stats.prompt_tokens += len(row.ids)
            self.stats.output_tokens += len(row.tokens)
        self.stats.extra["prefill_tokens_computed"] += computed
        self.stats.extra["prefill_tokens_reused"] += sum(len(r.ids) for r in rows) - computed
        self.stats.calls += 1
        self.stats.generate_seconds += seconds
        return results

    def _decode(self, rows: list[_Row], slots: int, cancel: threading.Event | None,
                on_text: OnText | None = None) -> int:
        """Run every row to its end; returns how many prompt tokens were computed (the rest were reused)."""
        unified = self.settings.kv_unified
        reuse = self.settings.prefix_cache
        started = time.perf_counter()
        computed, made, grouped = self._prepare_prefixes(rows, cancel) if reuse else (0, set(), set())
        charge = computed  # prefix tokens computed for this call: counted as computed by the first rows reusing them
        self._timed("prefill", started, computed)
        pending = list(rows)  # admitted in request order
        live: list[_Row] = []
        free_cells = self._n_ctx  # unified: rows share the cells
        while True:
            feed: list[_Row] = []
            for row in live:  # every live row has fresh logits: take its token
                request = row.request
                if request.choices and not row.tokens:  # a `choice` answer: best option, then done
                    row.tokens.append(row.pick)
                    row.finished = True
                elif self._l.llama_vocab_is_eog(self._vocab, row.next):
                    row.finished = True
                else:
                    row.tokens.append(row.next)
                    row.logprobs.append(row.next_logprob)
                    if on_text is not None:
                        on_text(row.index, self.detokenize(row.tokens))
                    if request.stop and _cut_at_stop(self.detokenize(row.tokens[-32:]), request.stop)[1]:
                        row.finished = True
                    elif len(row.tokens) < request.max_new_tokens:
                        feed.append(row)
                        continue
                self._l.llama_memory_seq_rm(self._mem, row.seq, -1, -1)  # this row is done: drop its KV
                free_cells += row.cells
            live = feed
            joining: list[_Row] = []
            for row in pending[:admit_rows(slots - len(live), len(pending), len(live))]:
                entry, row.reused = self._prefixes.best(row.ids, len(row.ids) - MIN_PIECE) if reuse else (None, 0)
                if row.reused < MIN_PIECE:
                    entry, row.reused = None, 0
                row.entry = entry
                row.cells = row.needs if unified else 0
                if row.cells > free_cells:
                    break
                free_cells -= row.cells
                joining.append(row)
            if not joining and pending and not live:
                raise BackendError(f"model {self.name!r}: request {pending[0].index} does not fit the KV cache; "
                                   f"raise models.<alias>.llamacpp.n_ctx")
            pending = pending[len(joining):]
            if not live and not joining:
                return computed
            taken = {r.seq for r in live}
            free_seqs = (s for s in range(1, self._n_seq) if s not in taken)  # lowest first: keeps ids consecutive
            for row in joining:
                row.seq = next(free_seqs)
                if row.entry is not None:
                    self._restore(row.entry, row.seq, row.reused)
                row.pos = row.reused
                mine = min(charge, row.reused)
                row.cached, charge = row.reused - mine, charge - mine
                computed += len(row.ids) - row.reused
            # in seq id order: llama.cpp puts only consecutive sequence ids (per-sequence KV) into one ubatch
            steps = [(row, [row.tokens[-1]]) for row in sorted(live, key=lambda r: r.seq)]
            prompts = [(row, row.ids[row.reused:]) for row in joining]
            if unified:  # everything in one batch: one pass over the weights (timed as prefill if it has prompts)
                started = time.perf_counter()
                self._run(steps + prompts, cancel)
                self._timed("prefill" if prompts else "decode", started,
                            sum(len(t) for _, t in prompts) or len(steps))
            else:  # each prompt alone, so its pieces are the same whatever else is running
                for item in ([steps] if steps else []) + [[p] for p in prompts]:
                    started = time.perf_counter()
                    self._run(item, cancel)
                    self._timed("decode" if item is steps else "prefill", started, sum(len(t) for _, t in item))
            for row in joining:  # a row sharing nothing with the call's others: its prompt may start the next call's
                if reuse and row.index not in grouped and len(row.ids) - row.reused > MIN_PIECE:
                    self._save(row.seq, row.ids, pinned=made)
            live = live + joining

    def _timed(self, phase: str, started: float, tokens: int) -> None:
        """Add llama_decode time to the prefill or decode totals of `stats` (called under the generate lock)."""
        if tokens:
            setattr(self.stats, f"{phase}_seconds", getattr(self.stats, f"{phase}_seconds") + time.perf_counter() - started)
            setattr(self.stats, f"{phase}_tokens", getattr(self.stats, f"{phase}_tokens") + tokens)

    def _save(self, seq: int, ids: Sequence[int], pinned: set = frozenset()) -> tuple[int, ...]:
        """Save sequence `seq`'s KV (it holds exactly the tokens `ids`) as the prefix state of `ids`."""
        L = self._l
        size = L.llama_state_seq_get_size(self._ctx, seq)
        buf = (ctypes.c_uint8 * size)()
        n = L.llama_state_seq_get_data(self._ctx, buf, size, seq)
        if n == 0:
            raise BackendError(f"model {self.name!r}: llama.cpp could not save the KV of sequence {seq}")
        return self._prefixes.put(ids, bytes(buf)[:n], pinned)

    def _restore(self, entry: tuple[int, ...], seq: int, keep: int) -> None:
        """Restore the saved prefix `entry` into the empty sequence `seq`, keeping its first `keep` tokens."""
        state = self._prefixes.get(entry)
        buf = (ctypes.c_uint8 * len(state)).from_buffer_copy(state)
        if self._l.llama_state_seq_set_data(self._ctx, buf, len(state), seq) == 0:
            raise BackendError(f"model {self.name!r}: llama.cpp could not restore a saved prefix of {len(entry)} "
                               f"tokens into sequence {seq} (no free KV cells: raise llamacpp.n_ctx)")
        if keep < len(entry):
            self._l.llama_memory_seq_rm(self._mem, seq, keep, -1)

    def _prepare_prefixes(self, rows: list[_Row], cancel: threading.Event | None) -> tuple[int, set, set[int]]:
        """Compute and save, once, the prefix of every group of rows sharing one that no saved state covers (a
        nested group extends its outer group's saved prefix).

        Returns (prefix tokens computed, the entries saved, indices of the rows in a group)."""
        computed, made, grouped = 0, set(), set()
        for prefix, members in shared_groups([r.ids for r in rows], self.settings.min_shared_tokens, MIN_PIECE):
            grouped.update(rows[i].index for i in members)
            entry, have = self._prefixes.best(prefix, len(prefix))
            if have == len(prefix):
                continue  # a saved state already covers it
            have = have if have >= MIN_PIECE else 0
            have = min(have, len(prefix) - MIN_PIECE)  # the new part is computed MIN_PIECE tokens or more
            try:
                if have:
                    self._restore(entry, PREFIX_SEQ, have)
                scratch = _Row(-1, GenerationRequest(()), prefix)
                scratch.seq, scratch.pos = PREFIX_SEQ, have
                self._run([(scratch, prefix[have:])], cancel, logits=False)
                made.add(self._save(PREFIX_SEQ, prefix, pinned=made))
            finally:
                self._l.llama_memory_seq_rm(self._mem, PREFIX_SEQ, -1, -1)
            computed += len(prefix) - have
        return computed, made, grouped

    def _run(self, items: list[tuple[_Row, list[int]]], cancel: threading.Event | None, logits: bool = True) -> None:
        """Feed each row its tokens at its next positions, in as few `llama_decode` calls as n_batch allows (a row's
        tokens are split into pieces of at least MIN_PIECE); with `logits`, each row gets its greedy pick (and a
        choice row its best option) from its last token's logits."""
        import numpy as np

        L, batch, cap = self._l, self._batch, self._cap
        n, outputs = 0, []

        def flush():
            nonlocal n, outputs
            if cancel is not None and cancel.is_set():
                done = sum(len(r.tokens) for r, _ in items)
                raise GenerationCancelled(f"model {self.name!r}: call cancelled after {done} tokens")
            batch.n_tokens = n
            status = L.llama_decode(self._ctx, batch)
            if status != 0:
                raise BackendError(f"model {self.name!r}: llama_decode failed with status {status} "
                                   f"({'no free KV slot: raise llamacpp.n_ctx' if status == 1 else 'see llama.cpp'})")
            for row, i in outputs:
                out = np.ctypeslib.as_array(L.llama_get_logits_ith(self._ctx, i), shape=(self._n_vocab,))
                row.next = int(out.argmax()) if row.grammar is None else self._constrained_pick(row.grammar, out)
                row.next_logprob = float(out[row.next]) - float(np.log(np.exp(out - out.max()).sum()) + out.max())
                if row.request.choices and not row.tokens:
                    allowed = self._choice_token_ids(row.request.choices)
                    row.pick = allowed[int(out[allowed].argmax())]
                    row.choice = choice_confidence([float(out[a]) for a in allowed])
            n, outputs = 0, []

        for row, tokens in items:
            left = len(tokens)
            while left:
                take = min(cap - n, left)
                if 0 < left - take < MIN_PIECE:  # never leave a 1-token tail for the next llama_decode
                    take -= MIN_PIECE - (left - take)
                if take < min(MIN_PIECE, left):  # no room for a full piece here: start a new llama_decode
                    flush()
                    continue
                for token in tokens[len(tokens) - left:len(tokens) - left + take]:
                    batch.token[n] = token
                    batch.pos[n] = row.pos
                    batch.n_seq_id[n] = 1
                    batch.seq_id[n][0] = row.seq
                    batch.logits[n] = False
                    row.pos += 1
                    n += 1
                left -= take
            if logits:
                batch.logits[n - 1] = True
                outputs.append((row, n - 1))
        if n:
            flush()

    def _grammar_sampler(self, schema: str):
        """A fresh grammar sampler for `schema` (JSON Schema text); a schema llama.cpp cannot take is a BackendError."""
        if schema not in self._gbnf:
            from llama_cpp.llama_grammar import json_schema_to_gbnf

            try:
                self._gbnf[schema] = json_schema_to_gbnf(schema)
            except Exception as exc:  # noqa: BLE001 - the converter raises bare exceptions on unsupported schemas
                raise BackendError(f"model {self.name!r}: cannot turn the request's json_schema into a grammar "
                                   f"({type(exc).__name__}: {exc})") from exc
        sampler = self._l.llama_sampler_init_grammar(self._vocab, self._gbnf[schema].encode(), b"root")
        if not sampler:
            raise BackendError(f"model {self.name!r}: llama.cpp rejected the grammar of the request's json_schema")
        return sampler

    def _constrained_pick(self, grammar, logits) -> int:
        """The greedy token the grammar allows (then accepted into the grammar's state): the unconstrained argmax
        when the grammar allows it, else the best token after masking the whole vocabulary."""
        import numpy as np

        L = self._l
        best = int(logits.argmax())
        one = (L.llama_token_data * 1)(L.llama_token_data(best, float(logits[best]), 0.0))
        arr = L.llama_token_data_array(one, 1, -1, False)
        L.llama_sampler_apply(grammar, ctypes.byref(arr))
        if not np.isfinite(one[0].logit):
            data = np.empty(self._n_vocab, dtype=[("id", np.int32), ("logit", np.float32), ("p", np.float32)])
            data["id"] = np.arange(self._n_vocab, dtype=np.int32)
            data["logit"] = logits
            data["p"] = 0.0
            arr = L.llama_token_data_array(data.ctypes.data_as(ctypes.POINTER(L.llama_token_data)), self._n_vocab,
                                           -1, False)
            L.llama_sampler_apply(grammar, ctypes.byref(arr))
            allowed = data["logit"]
            if not np.isfinite(allowed).any():
                raise BackendError(f"model {self.name!r}: the grammar of the request's json_schema allows no token")
            best = int(allowed.argmax())
        L.llama_sampler_accept(grammar, best)
        return best

    def _clear_rows(self, keep_prefix: bool) -> None:
        """Drop every row's KV after a call; after a failed one (cancelled, error) the saved prefixes too."""
        for seq in range(1, self._n_seq):
            self._l.llama_memory_seq_rm(self._mem, seq, -1, -1)
        if not keep_prefix:
            self._l.llama_memory_clear(self._mem, False)
            self._prefixes.clear()


def _cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    cut = min((text.find(s) for s in stops if s and s in text), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)
