"""Config -> objects, the Hydra way: `_target_` groups with `instantiate`, dataclass-schema groups (compiler,
cluster, experts, aggregator, retry) with `OmegaConf.to_object`, after the cross-group checks of `check_config`."""
from __future__ import annotations

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from compllm.backends.pool import ModelPool
from compllm.config.checks import check_config
from compllm.experts import experts_from_config
from compllm.pipeline import Pipeline


def build_pipeline(cfg: DictConfig) -> Pipeline:
    check_config(cfg)
    compiler_config = OmegaConf.to_object(cfg.compiler)
    if cfg.policy.get("cascade") is not None:  # the compiler's to plan (a cascade pass), not the executor's
        compiler_config.cascade = OmegaConf.to_object(cfg.policy.cascade)
    return Pipeline(
        pool=ModelPool(OmegaConf.to_container(cfg.models, resolve=True, enum_to_str=True), cache_dir=cfg.cache_dir),
        experts=experts_from_config(cfg.experts),
        decomposer=instantiate(cfg.decomposer, _convert_="all"),
        router=instantiate(cfg.router, _convert_="all"),
        aggregator=OmegaConf.to_object(cfg.aggregator),
        policy=build_policy(cfg),
        max_answer_chars=cfg.max_answer_chars,
        compiler_config=compiler_config,
        cluster=OmegaConf.to_object(cfg.cluster),
        cache_dir=cfg.cache_dir,
        retry=OmegaConf.to_object(cfg.retry),
        auto_calibrate=cfg.auto_calibrate,
        show_progress=cfg.show_progress,
    )


def build_policy(cfg: DictConfig):
    """The policy's executor; on `cluster=ray` the same policy (name, barrier) run by the Ray executor."""
    policy_cfg = OmegaConf.to_container(cfg.policy, resolve=True)
    policy_cfg.pop("cascade", None)  # planned by the compiler (build_pipeline), not the executor's
    policy = instantiate(policy_cfg)
    cluster = cfg.get("cluster")
    if cluster is None or str(getattr(cluster.executor, "value", cluster.executor)) != "ray":
        return policy
    from compllm.runtime.ray_executor import RayExecutor

    return RayExecutor(policy.name, policy.barrier, OmegaConf.to_object(cluster.ray))
