"""The hf backend's phase counters (ModelStats.prefill_*/decode_*) on the real SmolLM2-135M: prefill counts every
prompt token, decode one token per live row per step (what experiments/bench_engines.py reads)."""
import pytest
from omegaconf import OmegaConf

from compllm.backends.base import GenerationRequest
from compllm.backends.pool import ModelPool

pytestmark = pytest.mark.model


def test_hf_prefill_and_decode_counters(compose, model_cache):
    cfg = compose("model=smollm2-135m", f"cache_dir={model_cache}")
    model = ModelPool(OmegaConf.to_container(cfg.models, resolve=True, enum_to_str=True),
                      cache_dir=model_cache).get("default")
    requests = [GenerationRequest(({"role": "user", "content": q},), 8) for q in ("Name three fruits.", "What is 2+2?")]
    got = model.generate(requests, max_live_rows=1)
    stats = model.stats
    assert stats.prefill_tokens == sum(g.prompt_tokens for g in got) and stats.prefill_seconds > 0
    # a row's last token is fed again only when it did not end the row
    assert sum(g.output_tokens - 1 for g in got) <= stats.decode_tokens <= sum(g.output_tokens for g in got)
    assert stats.decode_seconds > 0
