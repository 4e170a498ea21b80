"""transformers backend: greedy, batched generation with left padding and the model's chat template."""
from __future__ import annotations

import functools
import inspect
import logging
import threading
import time
from typing import Sequence

from compiler.cost import admit_rows
from compllm.backends.base import BackendError, Generation, GenerationRequest, ModelStats

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
        self._lock = threading.Lock()  # one generate at a time per model copy
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

    def generate(self, requests: Sequence[GenerationRequest], max_live_rows: int | None = None) -> list[Generation]:
        """Greedy answers for `requests`, decoded together; at most `max_live_rows` rows decode at once (None: all).

        With a cap below len(requests), the call runs as a continuously refilled batch: rows join (in request
        order, see `compiler.cost.admit_rows`) as others finish, so a long answer never decodes alone while
        work is waiting.
        """
        import torch

        if not requests:
            return []
        slots = len(requests) if max_live_rows is None else max(1, min(max_live_rows, len(requests)))
        prompts = [self.render(r) for r in requests]
        with self._lock, torch.inference_mode():
            start = time.perf_counter()
            rows, prompt_tokens = self._decode(prompts, requests, slots)
            seconds = time.perf_counter() - start
        results = []
        for request, (ids, finished), n_prompt in zip(requests, rows, prompt_tokens):
            text, stopped = _cut_at_stop(self.tokenizer.decode(ids, skip_special_tokens=True), request.stop)
            results.append(
                Generation(
                    text=text.strip(),
                    prompt_tokens=n_prompt,
                    output_tokens=len(ids),
                    seconds=seconds,
                    finish_reason="stop" if (finished or stopped) else "length",
                    batch_size=len(requests),
                )
            )
            self.stats.prompt_tokens += n_prompt
            self.stats.output_tokens += len(ids)
        self.stats.calls += 1
        self.stats.generate_seconds += seconds
        return results

    def _decode(self, prompts: Sequence[str], requests: Sequence[GenerationRequest],
                slots: int) -> tuple[list[tuple[list[int], bool]], list[int]]:
        """Greedy decoding of left-padded rows; each row leaves the batch as soon as it is done.

        `model.generate` keeps finished rows in the batch until the longest one ends, so one rambling answer
        makes every row pay its decode steps; here a row leaves (its KV rows are dropped) at its own end of
        sequence, stop string or `max_new_tokens`, the step cost shrinks with the live batch, and waiting
        rows are prefilled and merged into the running batch (at most `slots` live) when `admit_rows` says so.
        Returns (new token ids without the end-of-sequence token, finished by eos/stop) per request, and each
        request's prompt token count.
        """
        import torch

        eos = self._eos_ids
        tokens: list[list[int]] = [[] for _ in requests]
        finished = [False] * len(requests)
        prompt_tokens = [0] * len(requests)
        pending = list(range(len(requests)))  # admitted in request order
        batch: _LiveBatch | None = None
        while pending or batch is not None:
            live = 0 if batch is None else len(batch.rows)
            admit = admit_rows(slots - live, len(pending), live)
            if admit:
                group, pending = pending[:admit], pending[admit:]
                joined = self._prefill([prompts[i] for i in group], group)
                for i, n in zip(group, joined.mask.sum(-1).tolist()):
                    prompt_tokens[i] = int(n)
                batch = joined if batch is None else batch.merge(joined)
            chosen = batch.logits.argmax(-1)
            keep = []
            for j, row in enumerate(batch.rows):
                token = int(chosen[j])
                if requests[row].choices and not tokens[row]:  # a `choice` answer: best option, then done
                    allowed = self._choice_token_ids(requests[row].choices)
                    tokens[row].append(allowed[int(batch.logits[j, allowed].argmax())])
                    finished[row] = True
                    continue
                if token in eos:
                    finished[row] = True
                    continue
                tokens[row].append(token)
                request = requests[row]
                if request.stop and _cut_at_stop(self.tokenizer.decode(tokens[row][-32:]), request.stop)[1]:
                    finished[row] = True
                elif len(tokens[row]) < request.max_new_tokens:
                    keep.append(j)
            if not keep:
                batch = None
                continue
            if len(keep) < len(batch.rows):
                batch = batch.select(keep)
                chosen = chosen[torch.tensor(keep, device=chosen.device)]
            batch.step(self, chosen)  # every live row has fresh logits again, so newcomers can merge in
        return [(ids, done) for ids, done in zip(tokens, finished)], prompt_tokens

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

    @functools.lru_cache(maxsize=64)
    def _choice_token_ids(self, choices: tuple[str, ...]) -> list[int]:
        """The first token of each choice (option letters are one token in every tokenizer we ship)."""
        ids = [self.tokenizer.encode(c, add_special_tokens=False)[0] for c in choices]
        if len(set(ids)) != len(ids):
            raise BackendError(f"choices {choices} do not start with distinct tokens")
        return ids

    @functools.cached_property
    def _eos_ids(self) -> set[int]:
        eos = self.model.generation_config.eos_token_id
        ids = set(eos if isinstance(eos, list) else [eos]) | {self.tokenizer.eos_token_id}
        return {i for i in ids if i is not None}


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
