"""Calibrating a served model (`backend: openai`) from the client's side: what a plan step will see.

Through the backend's own `generate` (the same requests, HTTP client and concurrency gate a plan step uses):
* prefill per prompt token: a long and a short prompt, 1 new token each, one at a time; the difference in latency
  over the difference in `usage.prompt_tokens`; what is left of the short one is the per-request overhead;
* decode per token at concurrency c (1/2/4/8): c requests in flight at once, each asked for `new_tokens`; the time
  after the first token, over the tokens the longest reply had. A server that batches keeps this flat as c grows;
  one that serialises requests (llama-cpp-python's bundled server) grows it ~c-fold, so the compiler does not
  plan concurrency that only queues. Stored as `decode_step_s_by_batch` (batch = requests in flight), which is
  how the cost model times a remote call's phases.
Every prompt starts with its own random words, so the server's prefix cache cannot serve one from another.
Minimum over `repeats` rounds, as in-process calibration. The server's memory is its own: weights and KV are 0.
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Sequence

from compiler.cost import ModelCost
from compllm.backends.base import GenerationRequest

CONCURRENCY = (1, 2, 4, 8)
WORDS = ("amber", "basalt", "cedar", "delta", "ember", "fjord", "garnet", "harbor", "iris", "juniper", "kestrel",
         "lagoon", "meadow", "nickel", "orchid", "pebble", "quartz", "raven", "saffron", "tundra")


@dataclass
class RemoteCalibration:
    cost: ModelCost
    latency_s_by_concurrency: dict[str, float] = field(default_factory=dict)  # wall of c requests at once
    prompt_tokens: int = 0  # of the long prefill probe, as the server counted them


def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def calibrate_remote(model, concurrency: Sequence[int] = CONCURRENCY, prompt_tokens: int = 256,
                     new_tokens: int = 32, repeats: int = 2, seed: int = 0) -> RemoteCalibration:
    """Measure `model` (an `OpenAIServerModel`) as described in the module docstring."""
    rng = random.Random(seed)
    sizes = sorted({c for c in concurrency if c >= 1} | {1})

    def ask(words: int, tokens: int) -> GenerationRequest:
        text = f"{_words(rng, 4)}. {_words(rng, words)}. Count from 1 to 500, separated by spaces."
        return GenerationRequest(({"role": "user", "content": text},), tokens)

    def timed(requests: list[GenerationRequest]):
        start = time.perf_counter()
        out = model.generate(requests, max_live_rows=len(requests))
        return time.perf_counter() - start, out

    long_words = max(8, prompt_tokens * 3 // 4)  # ~0.75 words per token for these words
    prefill, overhead, first, steps, walls = [], [], [], {str(c): [] for c in sizes}, {str(c): [] for c in sizes}
    long_p = 0
    for round_ in range(repeats + 1):  # round 0 warms up (connection, server caches)
        t_long, (g_long,) = timed([ask(long_words, 1)])
        t_short, (g_short,) = timed([ask(2, 1)])
        per_token = max(t_long - t_short, 0.0) / max(g_long.prompt_tokens - g_short.prompt_tokens, 1)
        for c in sizes:
            wall, gens = timed([ask(2, new_tokens) for _ in range(c)])
            tokens = max(g.output_tokens for g in gens)
            if round_:
                steps[str(c)].append(max(wall - t_short, 1e-6) / max(tokens - 1, 1))
                walls[str(c)].append(wall)
        if round_:
            prefill.append(per_token)
            first.append(t_short)
            overhead.append(max(t_short - per_token * g_short.prompt_tokens, 0.0))
            long_p = g_long.prompt_tokens
    table = {c: min(v) for c, v in steps.items()}
    cost = ModelCost(weight_bytes=0, kv_bytes_per_token=0, prefill_s_per_token=max(min(prefill), 1e-7),
                     decode_s_per_token=table["1"], call_overhead_s=min(overhead), load_s=0.0,
                     decode_step_s_by_batch=table)
    return RemoteCalibration(cost, {c: min(v) for c, v in walls.items()}, long_p)
