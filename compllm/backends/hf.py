"""transformers backend: greedy, batched generation with left padding and the model's chat template.

A request with a `json_schema` decodes under it (`compllm/backends/grammar.py`, xgrammar): its row's greedy token is
the best one the schema allows, and `Generation.constrained` says so; rows without one decode exactly as before."""
from __future__ import annotations

import functools
import inspect
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Sequence

from compiler.cost import admit_rows
from compllm.backends.base import (BackendError, choice_confidence, text_confidence, BackendOutOfMemory, Generation, GenerationCancelled,
                                   GenerationRequest, ModelStats, OnText)
from compllm.backends.grammar import RowGrammar, SchemaGrammars

log = logging.getLogger(__name__)

DTYPES = ("auto", "bfloat16", "float16", "float32")
DECODE_MATMULS = ("auto", "torch")
SKINNY_ROWS = 16  # inputs with at most this many rows (decode steps of batches up to 16) take the skinny path


def resolve_dtype(dtype: str, device: str) -> str:
    """`auto`: bf16 on GPUs and on CPUs with native bf16 (AVX512-BF16/AMX), else fp32.

    Measured on a 2-core AVX2 CPU without bf16: SmolLM2 prefill of 480 tokens took 22 s in bf16
    against 1.1 s in fp32, so bf16 must not be assumed on CPU.
    """
    if dtype != "auto":
        return dtype
    if device.startswith("cuda"):
        return "bfloat16"
    import torch

    try:
        native_bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        native_bf16 = False
    return "bfloat16" if native_bf16 else "float32"


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BackendError(f"device {device!r} requested but CUDA is not available here; use device=cpu or auto")
    return device


class HFModel:
    """A causal LM loaded once from a local HF directory (or repo id) and shared by every expert naming it."""

    def __init__(self, name: str, path: str, dtype: str = "auto", device: str = "auto", gguf_file: str | None = None,
                 revision: str | None = None, decode_matmul: str = "auto"):
        import torch
        from transformers import AutoTokenizer

        from compllm.backends.weights import load_causal_lm

        if dtype not in DTYPES:
            raise BackendError(f"model {name!r}: dtype {dtype!r} is not one of {', '.join(DTYPES)}")
        if decode_matmul not in DECODE_MATMULS:
            raise BackendError(f"model {name!r}: decode_matmul {decode_matmul!r} is not one of "
                               f"{', '.join(DECODE_MATMULS)}")
        self.name = name
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.stats = ModelStats()
        self._lock = threading.Lock()  # guards the stats: calls from several threads share one engine
        self._choice_ids: dict[tuple[str, ...], list[int]] = {}  # per instance: never keeps an evicted model alive
        start = time.perf_counter()
        kwargs = {k: v for k, v in (("gguf_file", gguf_file), ("revision", revision)) if v}
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
            self.model = load_causal_lm(path, getattr(torch, self.dtype), **kwargs)  # no mapped bf16 copy held
        except OSError as exc:
            raise BackendError(f"model {name!r}: cannot load weights from {path!r}: {exc}") from exc
        self.model.to(self.device).eval()
        self.skinny_linears = use_skinny_linears(self.model) if decode_matmul == "auto" and self.device == "cpu" else 0
        self.tokenizer.padding_side = "left"  # batched decoding needs prompts aligned on the right
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if not getattr(self.tokenizer, "chat_template", None):
            raise BackendError(f"model {name!r} at {path!r} has no chat template; use an instruct model")
        self.stats.load_seconds = time.perf_counter() - start
        log.info("loaded %s from %s in %.1fs on %s (%s)", name, path, self.stats.load_seconds, self.device, self.dtype)

    @property
    def weight_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    def render(self, request: GenerationRequest) -> str:
        return self.tokenizer.apply_chat_template(list(request.messages), tokenize=False, add_generation_prompt=True)

    def generate(self, requests: Sequence[GenerationRequest], max_live_rows: int | None = None,
                 cancel: threading.Event | None = None, on_text: OnText | None = None) -> list[Generation]:
        """Greedy answers for `requests`, decoded together; at most `max_live_rows` rows decode at once (None: all).

        With a cap below len(requests), the call runs as a continuously refilled batch: rows join (in request
        order, see `compiler.cost.admit_rows`) as others finish, so a long answer never decodes alone while
        work is waiting. Calls made at the same time from several threads (the planner's and the plan's, or
        several requests of a server) decode their rows in one batch (`_Engine`). `cancel` is checked before
        every forward pass; `on_text(row, text so far)` is called as each row's text grows.
        """
        if not requests:
            return []
        slots = len(requests) if max_live_rows is None else max(1, min(max_live_rows, len(requests)))
        call = _Call(list(requests), [self.render(r) for r in requests], slots, cancel, on_text)
        # compiled here, on the caller's thread (once per schema), so no other call's decoding waits for it
        call.grammars = [self._grammars.row(r.json_schema) if r.json_schema and not r.choices else None
                         for r in requests]
        start = time.perf_counter()
        self._engine.run(call)
        seconds = time.perf_counter() - start
        results = []
        for request, ids, finished, n_prompt, logprobs, choice, grammar in zip(
                requests, call.tokens, call.finished, call.prompt_tokens, call.logprobs, call.choice, call.grammars):
            text, stopped = _cut_at_stop(self.tokenizer.decode(ids, skip_special_tokens=True), request.stop)
            confidence, probs = choice if choice is not None else (text_confidence(logprobs), ())
            results.append(Generation(text=text.strip(), prompt_tokens=n_prompt, output_tokens=len(ids),
                                      seconds=seconds, finish_reason="stop" if (finished or stopped) else "length",
                                      batch_size=len(requests), confidence=confidence, choice_probs=probs,
                                      constrained=grammar is not None))
        with self._lock:
            self.stats.prompt_tokens += sum(call.prompt_tokens)
            self.stats.output_tokens += sum(map(len, call.tokens))
            self.stats.calls += 1
            self.stats.generate_seconds += seconds
        return results

    def _timed(self, phase: str, started: float, tokens: int) -> None:
        """Add a forward pass to the prefill or decode totals of `stats` (the engine thread calls it)."""
        seconds = time.perf_counter() - started
        with self._lock:
            setattr(self.stats, f"{phase}_seconds", getattr(self.stats, f"{phase}_seconds") + seconds)
            setattr(self.stats, f"{phase}_tokens", getattr(self.stats, f"{phase}_tokens") + tokens)

    @functools.cached_property
    def _grammars(self) -> SchemaGrammars:
        """This tokenizer's compiled JSON-schema grammars, over the logits' width (Qwen pads its vocabulary)."""
        width = self.model.get_output_embeddings().weight.shape[0]
        return SchemaGrammars(self.name, self.tokenizer, max(width, len(self.tokenizer)), self._eos_ids)

    @functools.cached_property
    def _engine(self) -> "_Engine":
        return _Engine(self)

    def close(self) -> None:
        """Let go of everything that keeps this model alive (the pool calls it on eviction)."""
        engine = self.__dict__.pop("_engine", None)
        if engine is not None:
            engine.join()

    def _prefill(self, prompts: Sequence[str], rows: Sequence[int]) -> "_LiveBatch":
        """Prefill `prompts` as one left-padded batch: a `_LiveBatch` holding their KV and first-token logits."""
        enc = self.tokenizer(list(prompts), return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        return self.prefill_ids(enc["input_ids"], enc["attention_mask"], rows)

    def prefill_ids(self, input_ids, mask, rows: Sequence[int]) -> "_LiveBatch":
        """Prefill token ids (left-padded, `mask` 0 on padding); also what calibration times."""
        from transformers import DynamicCache

        cache = DynamicCache()
        positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)
        logits = self._forward(input_ids, mask, positions, cache)[:, -1, :]
        return _LiveBatch(list(rows), cache, mask, positions[:, -1:] + 1, logits)

    def _forward(self, input_ids, attention_mask, position_ids, cache):
        """One forward pass that fills `cache`, computing logits for the last position only."""
        kwargs = {self._cache_kwarg: cache}
        return self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=True, logits_to_keep=1, **kwargs).logits

    @functools.cached_property
    def _cache_kwarg(self) -> str:
        """transformers 5.x names the forward's cache argument `cache`; 4.x `past_key_values`."""
        return "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"

    def _choice_token_ids(self, choices: tuple[str, ...]) -> list[int]:
        """The first token of each choice (option letters are one token in every tokenizer we ship)."""
        if choices not in self._choice_ids:
            ids = [self.tokenizer.encode(c, add_special_tokens=False)[0] for c in choices]
            if len(set(ids)) != len(ids):
                raise BackendError(f"choices {choices} do not start with distinct tokens")
            self._choice_ids[choices] = ids
        return self._choice_ids[choices]

    @functools.cached_property
    def _eos_ids(self) -> set[int]:
        eos = self.model.generation_config.eos_token_id
        ids = set(eos if isinstance(eos, list) else [eos]) | {self.tokenizer.eos_token_id}
        return {i for i in ids if i is not None}


@dataclass(eq=False)
class _Call:
    """One generate() call's rows as the engine decodes them."""

    requests: list[GenerationRequest]
    prompts: list[str]
    slots: int  # at most this many of its rows live at once
    cancel: threading.Event | None
    on_text: OnText | None
    pending: list[int] = field(default_factory=list)  # rows not admitted yet, in request order
    live: int = 0
    tokens: list[list[int]] = field(default_factory=list)
    finished: list[bool] = field(default_factory=list)
    prompt_tokens: list[int] = field(default_factory=list)
    logprobs: list[list[float]] = field(default_factory=list)  # each row's greedy tokens' log-probs
    choice: list[tuple[float, tuple[float, ...]] | None] = field(default_factory=list)  # (margin, probs) per row
    grammars: list[RowGrammar | None] = field(default_factory=list)  # each row's json_schema state (None: free)
    left: int = 0  # rows not done
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        n = len(self.requests)
        self.pending, self.tokens = list(range(n)), [[] for _ in range(n)]
        self.finished, self.prompt_tokens, self.left = [False] * n, [0] * n, n
        self.logprobs, self.choice, self.grammars = [[] for _ in range(n)], [None] * n, [None] * n


class _Engine:
    """Continuous batching across calls: the rows of every call in flight on this model decode as one batch.

    One engine thread runs while any call is in flight (and ends when none is, so an evicted model is not kept
    alive): each round it admits waiting rows per call (`admit_rows`, at most the call's slots live; each call's
    group is prefilled on its own, so a prefill never needs more scratch memory than its call was planned with),
    then runs one decode step for every live row. A row leaves at its end of sequence, stop string or
    `max_new_tokens` (its KV dropped); a call returns when its last row has left. `model.generate` keeps
    finished rows until the longest is done; here the step cost follows the live rows."""

    def __init__(self, model: "HFModel"):
        self.model = model
        self.calls: list[_Call] = []
        self.cond = threading.Condition()
        self.running = False
        self.thread: threading.Thread | None = None

    def run(self, call: _Call) -> None:
        with self.cond:
            self.calls.append(call)
            if not self.running:
                self.running = True
                self.thread = threading.Thread(target=self._loop, name=f"compllm-engine-{self.model.name}",
                                               daemon=True)
                self.thread.start()
            self.cond.notify_all()
        call.done.wait()
        if call.error is not None:
            raise call.error

    def _loop(self) -> None:
        import torch

        batch: _LiveBatch | None = None
        while True:
            with self.cond:
                calls = list(self.calls)
                if not calls:
                    self.running = False
                    return
            try:
                with torch.inference_mode():
                    batch = self._round(batch, calls)
            except BaseException as exc:  # a failed forward fails every call in flight, not the engine
                if isinstance(exc, torch.OutOfMemoryError):
                    exc = BackendOutOfMemory(f"model {self.model.name!r} ran out of device memory: {exc}")
                batch = None
                for call in calls:
                    self._end(call, exc)

    def join(self, timeout: float = 30.0) -> None:
        """Wait for an idle engine's thread to end (its frame holds the model, so eviction waits for it)."""
        thread = self.thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _end(self, call: _Call, error: BaseException | None = None) -> None:
        call.error = error
        with self.cond:
            if call in self.calls:
                self.calls.remove(call)
        call.done.set()

    def _round(self, batch: "_LiveBatch | None", calls: list[_Call]) -> "_LiveBatch | None":
        import torch

        model = self.model
        for call in calls:  # cancelled calls leave at once, with their rows
            if call.cancel is not None and call.cancel.is_set():
                if batch is not None:
                    keep = [j for j, (c, _) in enumerate(batch.rows) if c is not call]
                    batch = batch.select(keep) if keep else None
                self._end(call, GenerationCancelled(f"model {model.name!r}: call cancelled after "
                                                    f"{sum(map(len, call.tokens))} tokens"))
        calls = [c for c in calls if not c.done.is_set()]
        for call in calls:
            admit = admit_rows(call.slots - call.live, len(call.pending), call.live)
            if admit:
                group, call.pending = call.pending[:admit], call.pending[admit:]
                started = time.perf_counter()
                joined = model._prefill([call.prompts[i] for i in group], [(call, i) for i in group])
                model._timed("prefill", started, int(joined.mask.sum()))
                for i, n in zip(group, joined.mask.sum(-1).tolist()):
                    call.prompt_tokens[i] = int(n)
                call.live += len(group)
                batch = joined if batch is None else batch.merge(joined)
        if batch is None:
            return None
        chosen = batch.logits.argmax(-1)
        failed: dict[_Call, BaseException] = {}
        for j, (call, row) in enumerate(batch.rows):  # rows under a json_schema: the best token it allows
            if (grammar := call.grammars[row]) is not None and call not in failed:
                try:
                    chosen[j] = grammar.pick(int(chosen[j]), batch.logits[j])
                except BackendError as exc:  # fails its own call only, not the others decoding alongside
                    failed[call] = BackendError(f"model {model.name!r}: {exc}")
        if failed:
            keep = [j for j, (c, _) in enumerate(batch.rows) if c not in failed]
            for call, exc in failed.items():
                self._end(call, exc)
            if not keep:
                return None
            batch = batch.select(keep)
            chosen = chosen[torch.tensor(keep, device=chosen.device)]
        # log-prob of each row's greedy token (answer confidence): its logit less the row's log-sum-exp
        logprobs = (batch.logits.gather(-1, chosen[:, None])[:, 0].float()
                    - torch.logsumexp(batch.logits.float(), -1)).tolist()
        keep = []
        for j, (call, row) in enumerate(batch.rows):
            if self._advance(call, row, int(chosen[j]), batch.logits[j], logprobs[j]):
                keep.append(j)
            else:
                call.live -= 1
                call.left -= 1
                if not call.left:
                    self._end(call)
        if not keep:
            return None
        if len(keep) < len(batch.rows):
            batch = batch.select(keep)
            chosen = chosen[torch.tensor(keep, device=chosen.device)]
        started = time.perf_counter()
        batch.step(model, chosen)  # every live row has fresh logits again, so newcomers can merge in
        model._timed("decode", started, len(batch.rows))
        return batch

    def _advance(self, call: _Call, row: int, token: int, logits, logprob: float) -> bool:
        """Apply one chosen token (greedy, with its log-prob) to a row; False when the row is done."""
        model, request, tokens = self.model, call.requests[row], call.tokens[row]
        if request.choices and not tokens:  # a `choice` answer: the best option letter, then done
            allowed = model._choice_token_ids(request.choices)
            scores = logits[allowed].float()
            tokens.append(allowed[int(scores.argmax())])
            call.choice[row] = choice_confidence(scores.tolist())
            call.finished[row] = True
            return False
        if token in model._eos_ids:
            call.finished[row] = True
            return False
        grammar = call.grammars[row]
        tokens.append(token)
        call.logprobs[row].append(logprob)
        if call.on_text is not None:
            call.on_text(row, model.tokenizer.decode(tokens, skip_special_tokens=True))
        if (request.stop and _cut_at_stop(model.tokenizer.decode(tokens[-32:]), request.stop)[1]) or (
                grammar is not None and grammar.terminated):
            call.finished[row] = True
            return False
        return len(tokens) < request.max_new_tokens


class _LiveBatch:
    """The rows decoding together: their KV cache, attention mask, next positions and last logits.

    Rows are left-padded to a common length; merging pads the shorter side on the left (masked out), and
    dropping rows crops the columns that are padding for every remaining row, so the cache never grows past
    the longest live row.
    """

    def __init__(self, rows: list[int], cache, mask, next_position, logits):
        self.rows, self.cache, self.mask, self.next_position, self.logits = rows, cache, mask, next_position, logits

    def step(self, model: HFModel, chosen) -> None:
        """One decode step: feed each row's chosen token, keep the logits of the next one."""
        import torch

        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.rows), 1)], dim=1)
        self.logits = model._forward(chosen[:, None], self.mask, self.next_position, self.cache)[:, -1, :]
        self.next_position = self.next_position + 1

    def select(self, keep: list[int]) -> "_LiveBatch":
        import torch

        index = torch.tensor(keep, device=self.mask.device)
        self.cache.batch_select_indices(index)
        mask = self.mask[index]
        lead = int((mask.cumsum(-1) == 0).sum(-1).min())  # columns that are padding in every remaining row
        cache = self.cache
        if lead:
            mask = mask[:, lead:]
            cache = _rebuild(self.cache, lambda t: t[:, :, lead:, :])
        return _LiveBatch([self.rows[j] for j in keep], cache, mask, self.next_position[index], self.logits[index])

    def merge(self, other: "_LiveBatch") -> "_LiveBatch":
        import torch
        import torch.nn.functional as F
        from transformers import DynamicCache

        length = max(self.mask.shape[1], other.mask.shape[1])

        def left_pad(b: "_LiveBatch"):
            pad = length - b.mask.shape[1]
            return F.pad(b.mask, (pad, 0)), [(F.pad(k, (0, 0, pad, 0)), F.pad(v, (0, 0, pad, 0)))
                                             for k, v in _layers(b.cache)]

        mask_a, kv_a = left_pad(self)
        mask_b, kv_b = left_pad(other)
        cache = DynamicCache(ddp_cache_data=[(torch.cat([ka, kb]), torch.cat([va, vb]))
                                             for (ka, va), (kb, vb) in zip(kv_a, kv_b)])
        return _LiveBatch(self.rows + other.rows, cache, torch.cat([mask_a, mask_b]),
                          torch.cat([self.next_position, other.next_position]), torch.cat([self.logits, other.logits]))


def _layers(cache) -> list[tuple]:
    return [(layer.keys, layer.values) for layer in cache.layers]


def _rebuild(cache, fn):
    from transformers import DynamicCache

    return DynamicCache(ddp_cache_data=[(fn(k), fn(v)) for k, v in _layers(cache)])


def use_skinny_linears(model) -> int:
    """Route decode-sized inputs of every `nn.Linear` through `weight @ x.T`; returns how many were switched.

    Why: a decode step multiplies a few rows by each weight matrix, and on CPU fp32 `F.linear` (x @ W.T) is slow
    for 2-8 rows while `weight @ x.T` is not (`experiments/bench_decode_step.py`: Qwen2.5-0.5B decode step by
    batch size, both kernels). Prefill (many rows) keeps `F.linear`.
    """
    import torch

    linear, mm = torch.nn.functional.linear, torch.mm

    def forward(module, x):
        if x.numel() > SKINNY_ROWS * x.shape[-1]:
            return linear(x, module.weight, module.bias)
        y = mm(module.weight, x.reshape(-1, x.shape[-1]).T).T
        if module.bias is not None:
            y = y + module.bias
        return y.reshape(*x.shape[:-1], y.shape[-1])

    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    for module in linears:
        module.forward = forward.__get__(module)
    return len(linears)


def _cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    cut = min((text.find(s) for s in stops if s and s in text), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)
