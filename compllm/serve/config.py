"""The `serve:` config node (conf/serve/default.yaml): where the server listens and how much it admits."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class ServeConfig:
    """Also the structured-config schema of `serve` (one dataclass per concept)."""

    host: str = "127.0.0.1"  # loopback unless told otherwise: no API key is required by default
    port: int = 8000
    model_name: str = "compllm-team"  # the deployment's name: what /v1/models lists and requests must name
    max_concurrent: int = 8  # requests in the pipe at once (they share one running plan)
    max_queue: int = 32  # requests waiting for a place beyond that; more -> 429
    request_timeout_s: float = 300.0  # per request, from arrival: past it -> 504 with what was answered so far
    api_key_env: Optional[str] = "COMPLLM_API_KEY"  # env var holding the key; unset/empty var -> no key required
    max_body_bytes: int = 1 << 20  # larger request bodies -> 413
    drain_timeout_s: float = 60.0  # on SIGTERM: how long in-flight requests may take to finish

    def __post_init__(self) -> None:
        if self.max_concurrent < 1 or self.max_queue < 0:
            raise ValueError("serve: max_concurrent >= 1 and max_queue >= 0")
        if self.request_timeout_s <= 0 or self.drain_timeout_s < 0 or self.max_body_bytes < 1:
            raise ValueError("serve: request_timeout_s > 0, drain_timeout_s >= 0, max_body_bytes >= 1")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"serve.port={self.port}: must be 0..65535")
