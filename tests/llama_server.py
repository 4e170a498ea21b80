"""A real OpenAI-compatible server for tests: llama.cpp's (llama-cpp-python's bundled server) serving the shipped
SmolLM2-135M GGUF on 127.0.0.1, started as a subprocess and stopped afterwards."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

SERVED_NAME = "smollm2-135m"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def smollm2_gguf(cache_dir: str) -> Path:
    """The shipped SmolLM2-135M GGUF, verified (assembled into the cache if it ships in parts)."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from compllm.config.schema import register

    register()
    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[1] / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["model=smollm2-135m"])
    return instantiate(cfg.models.default.source).gguf_path(cache_dir)


@contextmanager
def llama_server(gguf: Path, port: int | None = None, log: Path | None = None) -> Iterator["Server"]:
    server = Server(gguf, port or free_port(), log)
    server.start()
    try:
        yield server
    finally:
        server.stop()


class Server:
    def __init__(self, gguf: Path, port: int, log: Path | None):
        self.gguf, self.port, self.log = gguf, port, log
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self, timeout: float = 120.0) -> None:
        out = open(self.log, "ab") if self.log else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "llama_cpp.server", "--model", str(self.gguf), "--model_alias", SERVED_NAME,
             "--host", "127.0.0.1", "--port", str(self.port), "--n_ctx", "4096", "--n_threads", "1",
             "--n_threads_batch", "1", "--logits_all", "true", "--verbose", "false"],
            stdout=out, stderr=out, env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama_cpp.server exited with {self.proc.returncode} (log: {self.log})")
            try:
                with urllib.request.urlopen(f"{self.url}/models", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"llama_cpp.server did not answer on port {self.port} within {timeout:g} s")

    def kill(self) -> None:
        """As a crash would: SIGKILL, no goodbye."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()
