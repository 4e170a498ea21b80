"""What calibration runs on a loaded hf model: its own prefill and decode step (timed), and one prefill whose memory
is measured (the workspace: activations and scratch beyond the KV cache).

Timed on the backend's own `prefill_ids` and `_LiveBatch.step` (the weight-major decode kernel included), never a
copy of the decode loop: "generate minus a separate prefill" once went negative for a bf16 model whose prefill
dominates, and the minimum over rounds then kept a decode step of 0 s.
"""
from __future__ import annotations

import gc
import time
from dataclasses import dataclass

from compllm.runtime.memory import PeakWindow, release_free_heap


@dataclass
class HFProbe:
    model: object  # compllm.backends.hf.HFModel

    def _ids(self, rows: int, tokens: int):
        import torch

        tok = self.model.tokenizer
        token = tok.bos_token_id or tok.eos_token_id or 0
        return torch.full((rows, tokens), token, dtype=torch.long, device=self.model.device)

    def _prefill(self, rows: int, tokens: int):
        ids = self._ids(rows, tokens)
        return self.model.prefill_ids(ids, ids.new_ones(ids.shape), range(rows))

    def prefill_seconds(self, rows: int, tokens: int) -> float:
        import torch

        with torch.inference_mode():
            start = time.perf_counter()
            self._prefill(rows, tokens)
            return time.perf_counter() - start

    def decode_step_seconds(self, rows: int, prompt_tokens: int, steps: int) -> float:
        import torch

        with torch.inference_mode():
            batch = self._prefill(rows, prompt_tokens)
            start = time.perf_counter()
            for _ in range(steps):
                batch.step(self.model, batch.logits.argmax(-1))
            return (time.perf_counter() - start) / steps

    def prefill_memory(self, rows: int, tokens: int) -> tuple[float, float]:
        """(workspace, KV) bytes per token of one `rows x tokens` prefill: the peak above its start minus the KV
        cache it keeps, and that KV cache (measured on the cache's tensors).

        The heap is trimmed first, so memory freed earlier and not yet given back cannot hide the peak."""
        import torch

        gc.collect()
        release_free_heap()
        with torch.inference_mode():
            with PeakWindow(device=str(self.model.device)) as window:
                batch = self._prefill(rows, tokens)
            kv = sum(t.numel() * t.element_size() for layer in batch.cache.layers for t in (layer.keys, layer.values))
            del batch
        return max(window.peak_above_start - kv, 0) / (rows * tokens), kv / (rows * tokens)
