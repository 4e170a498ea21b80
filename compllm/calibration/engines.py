"""What the compiler is told about each model's engine and each expert's shared prompt prefix.

`engine_of` reads a model alias's config: which backend runs it, whether it keeps shared prefixes (llama.cpp's
`llamacpp.prefix_cache`, a server's `server.prefix_cache`), a server's concurrency (`server.max_concurrency`), and
whether its prefill is left-padded (hf only). `prefix_tokens` counts the prompt tokens every call of an expert
starts with (chat template head + system prompt): exactly, from the two renders' common tokens, when the model is
loaded and can render and tokenize (llama.cpp); else estimated like node prompts are (characters / 4).
"""
from __future__ import annotations

from typing import Mapping

from compiler.build import CHARS_PER_TOKEN
from dataclasses import replace

from compiler.cost import CostModel, Engine, ModelCost
from compllm.backends.base import GenerationRequest

TEMPLATE_TOKENS = 5  # a chat template's tokens around the system turn ("<|im_start|>system\n" ... "<|im_end|>\n")


def engine_of(spec: Mapping) -> Engine:
    backend = str(spec.get("backend", "hf"))
    if backend == "openai":
        server = spec.get("server") or {}
        return Engine("openai", bool(server.get("prefix_cache", True)), int(server.get("max_concurrency", 8)),
                      left_padded=False)
    if backend == "llamacpp":
        return Engine("llamacpp", bool((spec.get("llamacpp") or {}).get("prefix_cache", True)), left_padded=False)
    return Engine(backend)


def remote_note(spec: Mapping, cost: ModelCost) -> str:
    """Where a served model is, and what its timings are: measured per concurrency, or defaults."""
    url = (spec.get("server") or {}).get("base_url", "?")
    if not cost.decode_step_s_by_batch:
        return f"at {url}, default timings (task=calibrate measures them)"
    steps = ", ".join(f"{c}: {s * 1e3:.0f}" for c, s in sorted(cost.decode_step_s_by_batch.items(), key=lambda kv: int(kv[0])))
    return (f"at {url}, calibrated: prefill {cost.prefill_s_per_token * 1e3:.2f} ms/token, decode ms/token by "
            f"requests in flight {{{steps}}}")


def prefix_tokens(pool, alias: str, system_prompt: str) -> int:
    """Prompt tokens every call with this system prompt starts with on model `alias` (see the module docstring)."""
    model = pool.loaded().get(alias)
    model = getattr(model, "inner", model)
    if model is not None and hasattr(model, "render") and hasattr(model, "tokenize"):
        a, b = (model.tokenize(model.render(GenerationRequest((
            {"role": "system", "content": system_prompt}, {"role": "user", "content": user}), 1)))
            for user in ("A", "Z"))
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        return n
    return len(system_prompt) // CHARS_PER_TOKEN + TEMPLATE_TOKENS


def with_engines(cost: CostModel, pool, system_prompts: Mapping[str, tuple[str, str]]) -> CostModel:
    """`cost` with every alias's engine and every expert's prefix tokens (`system_prompts`: expert -> (alias,
    system prompt))."""
    cost.engines = {alias: engine_of(pool.spec(alias)) for alias in cost.models}
    for alias, engine in cost.engines.items():
        if engine.remote:
            cost.engines[alias] = replace(engine, note=remote_note(pool.spec(alias), cost.models[alias]))
    cost.prefix_tokens = {expert: prefix_tokens(pool, alias, prompt)
                          for expert, (alias, prompt) in system_prompts.items()}
    return cost
