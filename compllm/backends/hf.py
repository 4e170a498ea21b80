"""transformers backend: greedy, batched generation with left padding and the model's chat template."""
from __future__ import annotations

import logging
import threading
import time
from typing import Sequence

from compllm.backends.base import BackendError, Generation, GenerationRequest, ModelStats

log = logging.getLogger(__name__)

DTYPES = ("auto", "bfloat16", "float16", "float32")


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
                 revision: str | None = None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if dtype not in DTYPES:
            raise BackendError(f"model {name!r}: dtype {dtype!r} is not one of {', '.join(DTYPES)}")
        self.name = name
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.stats = ModelStats()
        self._lock = threading.Lock()  # one generate at a time per model copy
        start = time.perf_counter()
        kwargs = {k: v for k, v in (("gguf_file", gguf_file), ("revision", revision)) if v}
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
            self.model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, self.dtype), **kwargs)
        except OSError as exc:
            raise BackendError(f"model {name!r}: cannot load weights from {path!r}: {exc}") from exc
        self.model.to(self.device).eval()
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

    def generate(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        import torch

        if not requests:
            return []
        prompts = [self.render(r) for r in requests]
        max_new = max(r.max_new_tokens for r in requests)
        # Stop strings end a row's decoding early, so only pass them when every row shares them;
        # otherwise each row is cut at its own stops after decoding.
        stops = list(requests[0].stop) if all(r.stop == requests[0].stop for r in requests) else []
        with self._lock, torch.inference_mode():
            start = time.perf_counter()
            enc = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
            out = self.model.generate(
                **enc,
                max_new_tokens=max_new,
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                pad_token_id=self.tokenizer.pad_token_id,
                stop_strings=stops or None,
                tokenizer=self.tokenizer if stops else None,
            )
            seconds = time.perf_counter() - start
        new_tokens = out[:, enc["input_ids"].shape[1]:]
        results = []
        for i, request in enumerate(requests):
            ids = new_tokens[i][: request.max_new_tokens].tolist()
            ids, finished = self._cut_at_eos(ids)
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            text, stopped = _cut_at_stop(text, request.stop)
            prompt_tokens = int(enc["attention_mask"][i].sum())
            results.append(
                Generation(
                    text=text.strip(),
                    prompt_tokens=prompt_tokens,
                    output_tokens=len(ids),
                    seconds=seconds,
                    finish_reason="stop" if (finished or stopped) else "length",
                    batch_size=len(requests),
                )
            )
            self.stats.prompt_tokens += prompt_tokens
            self.stats.output_tokens += len(ids)
        self.stats.calls += 1
        self.stats.generate_seconds += seconds
        return results

    def _cut_at_eos(self, ids: list[int]) -> tuple[list[int], bool]:
        """Drop everything from the first end-of-sequence token (padding after a finished row too)."""
        eos = self.model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos]) | {self.tokenizer.eos_token_id}
        for pos, tok in enumerate(ids):
            if tok in eos_ids:
                return ids[:pos], True
        return ids, False


def _cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    cut = min((text.find(s) for s in stops if s and s in text), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)
