"""On the real shipped SmolLM2-135M: an evicted model is really gone from the process (nothing keeps it alive:
not a choice-token cache, not a fault-injection wrapper), and a cancelled call stops within a decode step."""
import gc
import re
import threading
import weakref

import pytest
from omegaconf import OmegaConf

from compllm.backends.base import GenerationCancelled, GenerationRequest
from compllm.backends.pool import ModelPool

pytestmark = pytest.mark.model

CHOICE = GenerationRequest(({"role": "user", "content": "Which is a fruit? Options: (A) apple (B) brick"},), 1, (),
                           ("A", "B"))


def pool(compose, model_cache, faults: bool) -> ModelPool:
    overrides = ["model=smollm2-135m", f"cache_dir={model_cache}"]
    if faults:
        overrides += ["models.default.fault_injection.enabled=true", "models.default.fault_injection.seed=1"]
    cfg = compose(*overrides)
    return ModelPool(OmegaConf.to_container(cfg.models, resolve=True, enum_to_str=True), cache_dir=model_cache)


@pytest.mark.parametrize("faults", [False, True], ids=["plain", "fault-injection"])
def test_evict_frees_the_model_after_choice_and_free_generation(compose, model_cache, faults):
    p = pool(compose, model_cache, faults)
    backend = p.get("default")
    model = backend.inner if faults else backend
    free = GenerationRequest(({"role": "user", "content": "Say hi."},), 4)
    assert [g.text for g in backend.generate([CHOICE, free])][0] in ("A", "B")  # fills the choice-token cache
    weights = weakref.ref(model.model)
    gone = weakref.ref(model)
    del backend, model
    p.evict("default")
    gc.collect()
    assert gone() is None and weights() is None, "the evicted model is still referenced"
    assert not p.loaded()


def test_a_cancelled_call_stops_within_a_decode_step(compose, model_cache):
    model = pool(compose, model_cache, False).get("default")
    long = GenerationRequest(({"role": "user", "content": "Write a very long story about a dragon."},), 400)
    cancel = threading.Event()
    threading.Timer(0.5, cancel.set).start()
    with pytest.raises(GenerationCancelled, match=r"after (\d+) tokens") as err:
        model.generate([long], cancel=cancel, max_live_rows=None)
    written = int(re.search(r"after (\d+) tokens", str(err.value)).group(1))
    assert written < 200  # it stopped at the next decode step after the cancel, far short of 400 tokens
    assert model.generate([GenerationRequest(({"role": "user", "content": "Say hi."},), 4)])[0].text  # still usable
