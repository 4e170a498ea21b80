"""GGUF -> safetensors HF directory, converted in a child process.

Converting loads the whole dequantized model (a 5.4 GiB peak for a 1.5B model). In the running
process that would count towards its measured peak memory, which must match the compiler's plan,
so `convert_gguf_to_hf` runs `convert_here` in a child Python instead (`main` is its entry point) and
streams the child's output into the log: its own progress lines (prefixed `compllm-convert:`) at
INFO, everything else (transformers' messages, a traceback) at DEBUG. A failed child becomes a
ModelSourceError carrying the child's last error line, never a traceback of the parent.
"""
from __future__ import annotations

import collections
import logging
import os
import shlex
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Sequence

from compllm.models.errors import ModelSourceError

log = logging.getLogger(__name__)
PREFIX = "compllm-convert: "
ERROR = PREFIX + "error: "
_TAIL_LINES = 40  # kept for the error message
# `-c`, not `-m compllm.models.convert`: the package imports this module, and runpy warns about running it twice
_CHILD = "import sys; from compllm.models.convert import main; sys.exit(main())"


def convert_gguf_to_hf(gguf_path: Path, out_dir: Path, dtype: str) -> None:
    """Convert in a child process so the dequantized model never occupies this one; failures -> ModelSourceError."""
    cmd = [sys.executable, "-c", _CHILD, str(gguf_path), str(out_dir), dtype]
    tail: collections.deque[str] = collections.deque(maxlen=_TAIL_LINES)
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                          env=_child_env(), stdin=subprocess.DEVNULL) as proc:
        try:
            for raw in proc.stdout:  # type: ignore[union-attr]
                line = raw.rstrip()
                if line:
                    tail.append(line)
                    log.log(logging.INFO if line.startswith(PREFIX) and not line.startswith(ERROR) else logging.DEBUG,
                            "%s", line)
            returncode = proc.wait()
        except BaseException:  # interrupted: do not leave a child converting into a temp dir about to vanish
            proc.kill()
            raise
    if returncode != 0:
        raise ModelSourceError(
            f"converting {gguf_path.name} to {dtype} safetensors failed: the child process "
            f"{_exit_reason(returncode)}: {_last_error(tail)}\n"
            f"To see its whole output, run it alone: {shlex.join(cmd[:-2] + ['/tmp/compllm-convert-out', dtype])}"
        )


def _child_env() -> dict[str, str]:
    """This process's environment, with this copy of compllm first on the path (not another installed one)."""
    env = dict(os.environ)
    here = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join([here] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["PYTHONUNBUFFERED"] = "1"  # lines arrive as they are printed
    env.setdefault("TQDM_DISABLE", "1")  # progress bars would flood the log with carriage-return lines
    return env


def _exit_reason(returncode: int) -> str:
    if returncode < 0:
        hint = " (out of memory?)" if -returncode == 9 else ""
        return f"was killed by signal {-returncode}{hint}"
    return f"exited with status {returncode}"


def _last_error(tail: Sequence[str]) -> str:
    """The child's own error line if it printed one, else its last line of output."""
    for line in reversed(tail):
        if line.startswith(ERROR):
            return line[len(ERROR):]
    return tail[-1] if tail else "(no output)"


def convert_here(gguf_path: Path, out_dir: Path, dtype: str) -> None:
    """Dequantize a GGUF with transformers and save a safetensors HF directory (model + tokenizer) into out_dir."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    _progress(f"loading the tokenizer from {name}")
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)  # the chat template comes from the GGUF
    _progress(f"dequantizing {name} to {dtype}")
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=getattr(torch, dtype))
    # transformers refuses save_pretrained on a GGUF-loaded model until the quantization marker is dropped
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    _progress(f"saving safetensors to {out_dir}")
    model.save_pretrained(str(out_dir))
    tok.save_pretrained(str(out_dir))  # no pad token added: the backend picks one


def _progress(message: str) -> None:
    print(PREFIX + message, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Child entry point: 0 on success; on failure the traceback, then one `compllm-convert: error:` line."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 3:
        print(f"{ERROR}usage: GGUF OUT_DIR DTYPE (got {args!r})", flush=True)
        return 2
    try:
        convert_here(Path(args[0]), Path(args[1]), args[2])
    except Exception as exc:  # noqa: BLE001 - reported to the parent as one line
        traceback.print_exc(file=sys.stdout)
        print(ERROR + f"{type(exc).__name__}: {exc}".replace("\n", " "), flush=True)
        return 1
    return 0
