"""What a model will cost, read from its converted directory without loading it (no torch): `config.json` for the
shape, the safetensors headers for the parameter count, `tokenizer.json` for the tokenizer.

Used for a model never calibrated on this machine, so the compiler can plan a memory budget before anything
loads. The memory estimates are fitted to measurements on this project's models (fp32 on CPU, `experiments/
bench_memory.py`) and lean high; the timings are a roofline (lower bounds). Calibration replaces all of them.
"""
from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

from compiler.cost import ModelCost

ELEMENT_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
_FILE_DTYPE_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                     "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
# Roofline hardware when nothing was measured: conservative for a small CPU box, ~H100-class for CUDA.
HARDWARE = {
    "cpu": {"mem_bandwidth_Bps": 10e9, "flops": 1e11},
    "cuda": {"mem_bandwidth_Bps": 2.0e12, "flops": 4e14},
}
# Resident bytes of a loaded fast tokenizer per byte of tokenizer.json, measured 12x (Qwen2.5: 131 MiB for 11.4 MB)
# and 13.7x (SmolLM2: 46 MiB for 3.5 MB); the larger, rounded up.
TOKENIZER_RESIDENT_PER_FILE_BYTE = 14.0
# Resident bytes per byte of parameters after a load: the allocator's slack (measured +3.4% for Qwen2.5-0.5B and
# +6.4% for SmolLM2-135M in fp32, read with pread).
WEIGHT_SLACK = 1.05
# Prefill activations per prompt token, in elements: the MLP's gate, up and product (3 x intermediate) and about
# eight hidden-sized tensors (residual, norms, q/k/v/o). Measured fp32 on CPU: Qwen2.5-0.5B 84 KiB/token for
# prefills of 0.5-4k tokens (calibration, 2 x 256 tokens: 85.0 KiB; this formula: 84.9 KiB).
WORKSPACE_INTERMEDIATES = 3
WORKSPACE_HIDDENS = 8


@dataclass(frozen=True)
class ModelFacts:
    params: int  # parameters stored in the weight files (tied embeddings once)
    largest_tensor_file_bytes: int  # the biggest tensor as stored: what a tensor-by-tensor load holds extra
    layers: int
    kv_heads: int
    head_dim: int
    hidden: int
    intermediate: int
    tokenizer_file_bytes: int

    def weight_bytes(self, dtype: str) -> int:
        """What the loaded model keeps resident: parameters in the compute dtype (plus allocator slack) and the
        tokenizer."""
        return int(self.params * ELEMENT_BYTES[dtype] * WEIGHT_SLACK
                   + self.tokenizer_file_bytes * TOKENIZER_RESIDENT_PER_FILE_BYTE)

    def kv_bytes_per_token(self, dtype: str) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * ELEMENT_BYTES[dtype]

    def workspace_bytes_per_token(self, dtype: str) -> float:
        return float((WORKSPACE_INTERMEDIATES * self.intermediate + WORKSPACE_HIDDENS * self.hidden)
                     * ELEMENT_BYTES[dtype])


def safetensors_header(path: Path) -> dict:
    """A safetensors file's header (tensor name -> dtype, shape, offsets), read without the tensors."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        if size > 100 << 20:
            raise ValueError(f"{path}: implausible safetensors header of {size} bytes")
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return header


def model_facts(directory: str | Path) -> ModelFacts:
    """Facts of a converted HF directory (raises OSError/ValueError/KeyError when it is not one)."""
    directory = Path(directory)
    cfg = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    cfg = cfg.get("text_config", cfg)  # multimodal configs nest the language model's
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    params, largest = 0, 0
    for name in files:
        for tensor in safetensors_header(directory / name).values():
            count = math.prod(tensor["shape"])
            params += count
            largest = max(largest, count * _FILE_DTYPE_BYTES.get(tensor["dtype"], 4))
    heads = int(cfg["num_attention_heads"])
    tokenizer = directory / "tokenizer.json"
    return ModelFacts(
        params=params,
        largest_tensor_file_bytes=largest,
        layers=int(cfg["num_hidden_layers"]),
        kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or int(cfg["hidden_size"]) // heads),
        hidden=int(cfg["hidden_size"]),
        intermediate=int(cfg.get("intermediate_size") or 4 * int(cfg["hidden_size"])),
        tokenizer_file_bytes=tokenizer.stat().st_size if tokenizer.is_file() else 0,
    )


def estimated_cost(facts: ModelFacts, dtype: str, device: str) -> ModelCost:
    """A documented estimate for a model never calibrated here: memory from the facts (see the constants above),
    timings from the roofline (`ModelCost.roofline`: lower bounds), the load transient as the largest stored tensor
    (the loader reads one tensor at a time, `compllm.backends.weights`)."""
    hw = HARDWARE["cuda" if device.startswith("cuda") else "cpu"]
    elem = ELEMENT_BYTES[dtype]
    roof = ModelCost.roofline(facts.params, elem, facts.layers, facts.kv_heads, facts.head_dim,
                              hw["mem_bandwidth_Bps"], hw["flops"], kv_bytes_per_elem=elem)
    return ModelCost(
        weight_bytes=facts.weight_bytes(dtype),
        kv_bytes_per_token=facts.kv_bytes_per_token(dtype),
        prefill_s_per_token=roof.prefill_s_per_token,
        decode_s_per_token=roof.decode_s_per_token,
        load_extra_bytes=facts.largest_tensor_file_bytes,
        workspace_bytes_per_token=facts.workspace_bytes_per_token(dtype),
    )
