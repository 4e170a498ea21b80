"""task=serve: the composed pipe behind an OpenAI-compatible HTTP API until SIGTERM/SIGINT, then drain and exit 0.

The models load in the background (GET /healthz answers 503 until the pipe is ready). On SIGTERM the server
stops accepting (new requests get 503, the listening socket closes), answers every request in flight within
`serve.drain_timeout_s`, lets the plan's started steps end, and returns.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from compllm.apps.build import build_pipeline

log = logging.getLogger("compllm")


def run(cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    import uvicorn

    from compllm.serve.app import create_app
    from compllm.serve.config import ServeConfig
    from compllm.serve.service import Service

    config: ServeConfig = OmegaConf.to_object(cfg.serve)
    service = Service(build_pipeline(cfg), config)

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            service.draining = True  # requests still arriving on open connections get 503
            super().handle_exit(sig, frame)
            # uvicorn re-raises the signal once shut down (the process would die of it); a drained stop exits 0
            self._captured_signals.clear()

    server = Server(uvicorn.Config(create_app(service), host=config.host, port=config.port, log_level="info",
                                   timeout_graceful_shutdown=config.drain_timeout_s, access_log=False))
    log.info("serving %r on http://%s:%d/v1 (models load in the background; GET /healthz)", config.model_name,
             config.host, config.port)
    server.run()
    drained = service.close(config.drain_timeout_s)
    log.info("stopped%s", "" if drained else " (the plan had not drained)")
    return {"served": config.model_name, "drained": drained}
