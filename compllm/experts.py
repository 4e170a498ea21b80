"""An expert is a role, not a model: a description to route by, a system prompt, and the model alias it runs on."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

from compllm.runtime.faults import RetryPolicy


@dataclass(frozen=True)
class Expert:
    name: str
    description: str
    model: str  # alias into the `models` config; experts naming one alias share its weights
    system_prompt: str
    exemplars: tuple[str, ...] = ()
    max_new_tokens: int = 96
    stop: tuple[str, ...] = ()
    retry: Optional[RetryPolicy] = None  # None: the run's `retry` policy

    def routing_texts(self) -> list[str]:
        return [self.description, *self.exemplars]


def experts_from_config(cfg: Mapping[str, Mapping[str, Any]]) -> dict[str, Expert]:
    """Build Expert objects from the `experts` config group (a mapping name -> fields)."""
    out = {}
    for name, fields in cfg.items():
        fields = dict(fields)
        fields.pop("name", None)
        out[name] = Expert(
            name=name,
            description=fields["description"],
            model=fields["model"],
            system_prompt=fields["system_prompt"],
            exemplars=tuple(fields.get("exemplars") or ()),
            max_new_tokens=int(fields.get("max_new_tokens", 96)),
            stop=tuple(fields.get("stop") or ()),
            retry=RetryPolicy(**fields["retry"]) if fields.get("retry") else None,
        )
    return out
