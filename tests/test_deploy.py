"""Every example deployment in conf/deploy/ composes into a server config (task=serve) with its own name, and the
team it describes: `compllm deploy=<name>` serves it with no Python written."""
from pathlib import Path

import pytest

DEPLOYS = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "conf" / "deploy").glob("*.yaml"))


def test_there_are_example_deployments():
    assert {"cpu_team", "two_sizes", "vllm_team"} <= set(DEPLOYS)


@pytest.mark.parametrize("name", DEPLOYS)
def test_a_deployment_composes_into_a_server_of_its_team(compose, name):
    cfg = compose(f"deploy={name}")
    assert cfg.task._target_ == "compllm.apps.serve.run"
    assert cfg.serve.model_name.startswith("compllm-")
    assert all(expert.model in cfg.models for expert in cfg.experts.values())


def test_experts_that_differ_by_size_name_two_models(compose):
    cfg = compose("deploy=two_sizes")
    assert cfg.experts.law.model == "big" and cfg.models.big.name == "Qwen2.5-Coder-1.5B-Instruct"
    assert cfg.experts.general.model == "default" and cfg.models.default.name == "Qwen2.5-Coder-0.5B-Instruct"


def test_a_served_team_uses_the_openai_backend_for_every_model(compose):
    cfg = compose("deploy=vllm_team")
    assert {str(m.backend.value if hasattr(m.backend, "value") else m.backend) for m in cfg.models.values()} == {"openai"}
    assert cfg.models.specialist.server.base_url != cfg.models.default.server.base_url


def test_a_deployment_still_takes_overrides(compose):
    cfg = compose("deploy=cpu_team", "model=smollm2-135m", "serve.port=8123")
    assert cfg.models.default.name == "SmolLM2-135M-Instruct" and cfg.serve.port == 8123
