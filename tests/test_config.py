"""Config errors are caught at compose time, before any model loads, with one line per problem."""
import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, ValidationError

from compllm.config.checks import ConfigError, check_config


def test_default_config_is_consistent(compose):
    cfg = compose()
    check_config(cfg)
    assert cfg.models.default.name == "Qwen2.5-Coder-0.5B-Instruct"
    assert {"law", "medicine", "economics", "science_math", "general"} <= set(cfg.experts)


def test_model_override_switches_every_role(compose):
    cfg = compose("model=smollm2-135m")
    assert cfg.models.default.name == "SmolLM2-135M-Instruct"
    assert {e.model for e in cfg.experts.values()} == {"default"}


def test_expert_on_unknown_model_is_named(compose):
    cfg = compose("experts.law.model=huge")
    with pytest.raises(ConfigError, match=r"experts.law.model='huge' names no configured model; configured: default"):
        check_config(cfg)


@pytest.mark.parametrize("override, valid", [
    ("models.default.dtype=float8", "auto, bfloat16, float16, float32"),
    ("models.default.backend=vllm", "hf, openai, llamacpp"),
    ("compiler.residency=fifo", "belady, lru"),
    ("aggregator.mode=vote", "join, model, every"),
    ("retry.retry_on=[error,meltdown]", "error, timeout, oom, empty"),
])
def test_enum_typos_fail_at_compose_time_listing_the_valid_values(compose, override, valid):
    with pytest.raises(ConfigCompositionException) as err:
        compose(override)
    assert f"expected one of [{valid}]" in str(err.value.__cause__)


def test_bad_device_is_named(compose):
    with pytest.raises(ConfigError, match="device='tpu'"):
        check_config(compose("models.default.device=tpu"))


def test_sequential_policy_compiles_every_node_alone(compose):
    from fakes import SEQUENTIAL

    cfg = compose("policy=sequential")
    assert cfg.policy.barrier and {k: cfg.compiler[k] for k in SEQUENTIAL} == SEQUENTIAL


def test_unknown_fallback_expert_is_named(compose):
    cfg = compose("router.fallback_expert=oracle")
    with pytest.raises(ConfigError, match="router.fallback_expert='oracle' is not an expert"):
        check_config(cfg)


def test_schema_rejects_typos_and_wrong_types(compose):
    with pytest.raises(ConfigCompositionException) as err:
        compose("router.threshhold=0.3")
    assert isinstance(err.value.__cause__, ConfigKeyError) or "threshhold" in str(err.value)
    with pytest.raises(ConfigCompositionException) as err:
        compose("decomposer.max_subqueries=many")
    assert isinstance(err.value.__cause__, ValidationError) or "max_subqueries" in str(err.value)


def test_unknown_group_option_lists_choices(compose):
    with pytest.raises(ConfigCompositionException, match="smollm2-135m"):
        compose("model=gpt-17")
