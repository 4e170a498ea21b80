"""Load a causal LM's weights without holding the on-disk copy while the compute-dtype copy is made.

Why: `from_pretrained(dtype=float32)` memory-maps the bf16 safetensors file and converts tensor by tensor, but the
mapped pages it touched stay in the process's resident set until the load ends, so loading Qwen2.5-0.5B (1.17 GiB
of bf16 on disk, 2.35 GiB in fp32) peaked 1.17 GiB above what the loaded model keeps (measured with
`compllm.runtime.memory.PeakWindow`: 3.61 GiB peak for 2.44 GiB kept). Reading each tensor with pread(2)
(safetensors' `backend="pread"`) reads into a buffer that is freed once that tensor is converted: the same load
then peaks at what it keeps (2.50 GiB; +0.06 GiB of allocator slack), in the same time, with identical logits.

Anything this does not handle (a repo id, a GGUF, `.bin` weights) loads the ordinary way.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def safetensors_files(path: str | Path) -> list[Path]:
    """The safetensors files of a local HF directory (sharded or not); [] when there are none."""
    directory = Path(path)
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        shards = dict.fromkeys(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        return [directory / name for name in shards]
    single = directory / "model.safetensors"
    return [single] if single.is_file() else []


def model_class(path: str):
    """(config, model class) of a local HF directory; importing the class is most of a first load's code import
    (transformers' model module: ~120 MiB resident), which calibration counts as base, not as the model's."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.auto.auto_factory import _get_model_class

    config = AutoConfig.from_pretrained(path)
    return config, _get_model_class(config, AutoModelForCausalLM._model_mapping)


def load_causal_lm(path: str, torch_dtype, **kwargs):
    """`AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, **kwargs)`, read with pread where possible."""
    from transformers import AutoModelForCausalLM

    files = safetensors_files(path) if not kwargs and Path(path).is_dir() else []
    if not files:
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, **kwargs)
    from safetensors import safe_open
    from transformers import GenerationConfig

    config, cls = model_class(path)
    handles, lazy = [safe_open(str(f), framework="pt", backend="pread") for f in files], {}
    try:
        # slices are read one tensor at a time as the loader converts them, never all at once
        lazy = {name: h.get_slice(name) for h in handles for name in h.keys()}
        model = cls.from_pretrained(None, config=config, state_dict=lazy, dtype=torch_dtype)
    finally:
        del lazy
        for h in handles:
            h.__exit__(None, None, None)
    try:  # from_pretrained(None, ...) cannot find it on its own; the backend reads its eos ids
        model.generation_config = GenerationConfig.from_pretrained(path)
    except OSError:
        log.debug("no generation_config.json in %s; keeping the model's defaults", path)
    return model
