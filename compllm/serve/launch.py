"""Start `compllm task=serve` as a subprocess on 127.0.0.1 and stop it with SIGTERM: for the tests and the
serving benchmark, which talk to the real server over HTTP."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional, Sequence


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, overrides: Sequence[str], log: Path, env: Optional[dict[str, str]] = None,
                 port: Optional[int] = None):
        self.port = port or free_port()
        self.overrides = [*overrides, "task=serve", "serve.host=127.0.0.1", f"serve.port={self.port}",
                          "show_progress=false", f"hydra.run.dir={log.parent / 'run'}"]
        self.log, self.env = log, {**os.environ, **(env or {})}
        self.proc: Optional[subprocess.Popen] = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 300.0) -> "ServerProcess":
        """Start and wait until GET /healthz answers 200 (the pipe is prepared)."""
        out = open(self.log, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "compllm.apps.main", *self.overrides], stdout=out,
                                     stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"compllm task=serve exited with {self.proc.returncode}: {self.tail()}")
            if self.health()[0] == 200:
                return self
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"compllm task=serve was not healthy within {timeout:g} s: {self.tail()}")

    def health(self) -> tuple[int, dict]:
        try:
            with urllib.request.urlopen(f"{self.url}/healthz", timeout=2) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"{}")
        except OSError:
            return 0, {}

    def metrics(self) -> str:
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=10) as r:
            return r.read().decode()

    def stop(self, timeout: float = 60.0) -> Optional[int]:
        """SIGTERM (a drained stop), SIGKILL past `timeout`; the exit status (None if it was never started)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        return self.proc.returncode

    def tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""


def metric(text: str, name: str, **labels: str) -> float:
    """One sample's value from Prometheus text (0 if absent); labels must match exactly those given."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    key = f"{name}{{{want}}}" if labels else name
    for line in text.splitlines():
        if line.startswith(key + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0
