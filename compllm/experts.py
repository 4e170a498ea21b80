"""An expert is a role, not a model: a description to route by, a system prompt, and the model alias it runs on.

`Expert` is also the structured-config schema of `experts.<name>` (one dataclass per concept): a misspelt key
or a missing description fails at compose time, and `experts_from_config` builds the objects with OmegaConf.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, List, Mapping, Optional

from omegaconf import MISSING, OmegaConf

from compllm.knowledge.config import KnowledgeConfig
from compllm.runtime.faults import RetryPolicy


@dataclass
class Expert:
    name: str = ""  # its key in `experts` (filled in when built from config)
    description: str = MISSING
    model: str = "default"  # alias into the `models` config; experts naming one alias share its weights
    system_prompt: str = MISSING
    exemplars: List[str] = field(default_factory=list)
    max_new_tokens: int = 96
    stop: List[str] = field(default_factory=list)
    retry: Optional[RetryPolicy] = None  # None: the run's `retry` policy
    # What it reads before answering: each of its sub-queries gets a retrieve node (compiler.build); None: closed-book
    knowledge: Optional[KnowledgeConfig] = None

    def routing_texts(self) -> list[str]:
        return [self.description, *self.exemplars]


def experts_from_config(cfg: Mapping[str, Any]) -> dict[str, Expert]:
    """`experts` config (name -> fields, validated against `Expert`) -> Expert objects named by their keys."""
    out = {}
    for name, node in cfg.items():
        expert = OmegaConf.to_object(node) if OmegaConf.is_config(node) else Expert(**dict(node))
        out[name] = replace(expert, name=name)
    return out
