"""Config -> objects. Everything is built with hydra.utils.instantiate from its group's `_target_`."""
from __future__ import annotations

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from compllm.backends.pool import ModelPool
from compllm.config.checks import check_config
from compllm.experts import experts_from_config
from compllm.pipeline import Pipeline
from compllm.runtime.faults import RetryPolicy


def build_pipeline(cfg: DictConfig) -> Pipeline:
    check_config(cfg)
    models = OmegaConf.to_container(cfg.models, resolve=True)
    experts = experts_from_config(OmegaConf.to_container(cfg.experts, resolve=True))
    return Pipeline(
        pool=ModelPool(models, cache_dir=cfg.cache_dir),
        experts=experts,
        decomposer=instantiate(cfg.decomposer, _convert_="all"),
        router=instantiate(cfg.router, _convert_="all"),
        aggregator=instantiate(cfg.aggregator, _convert_="all"),
        policy=instantiate(cfg.policy),
        max_answer_chars=cfg.max_answer_chars,
        compiler_config=OmegaConf.to_object(cfg.compiler),
        cache_dir=cfg.cache_dir,
        retry=RetryPolicy(**OmegaConf.to_container(cfg.retry)),
        auto_calibrate=cfg.auto_calibrate,
    )
