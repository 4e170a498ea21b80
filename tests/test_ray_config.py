"""`cluster=ray` as config: it composes, validates at compose time, and turns the chosen policy into the Ray
executor (same name and barrier) without importing Ray; `cluster=local` (the default) keeps the local executor."""
import pytest
from omegaconf import OmegaConf

from compllm.apps.build import build_policy
from compllm.runtime.executor import PlanExecutor
from compllm.runtime.ray_executor import RayClusterConfig, RayExecutor


def test_default_cluster_is_local_and_keeps_the_local_executor(compose):
    cfg = compose()
    assert cfg.cluster.name == "local" and cfg.cluster.executor.value == "local" and not cfg.cluster.nodes
    assert type(build_policy(cfg)) is PlanExecutor


@pytest.mark.parametrize("policy,barrier", [("compiled", False), ("level", True), ("sequential", True)])
def test_cluster_ray_runs_the_same_policy_on_the_ray_executor(compose, policy, barrier):
    cfg = compose("cluster=ray", f"policy={policy}", "cluster.ray.max_restarts=3", "cluster.ray.address=auto")
    ex = build_policy(cfg)
    assert isinstance(ex, RayExecutor) and (ex.name, ex.barrier) == (policy, barrier)
    assert ex.cluster == RayClusterConfig(address="auto", max_restarts=3)


def test_a_misspelt_ray_setting_fails_at_compose_time_naming_the_schema(compose):
    with pytest.raises(Exception, match="Could not override 'cluster.ray.max_restart'") as err:
        compose("cluster=ray", "cluster.ray.max_restart=3")
    assert "RayClusterConfig" in str(err.value.__cause__)


def test_an_unknown_cluster_executor_lists_the_valid_ones(compose):
    with pytest.raises(Exception, match="cluster.executor=slurm") as err:
        compose("cluster.executor=slurm")
    assert "expected one of [local, ray]" in str(err.value.__cause__)


def test_invalid_ray_settings_are_refused_with_the_rule():
    with pytest.raises(ValueError, match="node_resource"):
        RayClusterConfig(node_resource=0)
    cfg = OmegaConf.structured(RayClusterConfig)
    assert OmegaConf.to_object(cfg) == RayClusterConfig()
