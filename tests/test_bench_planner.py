"""experiments/bench_planner.py's arithmetic and item split, without a model: every variant composes, the exemplars
are never evaluated, and the aggregates (strict edge recall, count ratio) are what they say."""
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_planner", ROOT / "experiments" / "bench_planner.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def row(n_pred, n_gold, recall, gold_edges=True, deps=()):
    return {"n_pred": n_pred, "n_gold": n_gold, "edge_recall": recall, "edge_precision": recall,
            "gold_has_edges": gold_edges, "node_precision": 1.0, "node_recall": 0.5, "fallback": False,
            "decoding": "constrained", "finish": "stop", "subqueries": [["q", list(deps)]]}


def test_aggregate_counts_undefined_recall_as_zero_only_in_the_strict_mean(bench):
    out = bench.aggregate([row(2, 4, 1.0, deps=(1,)), row(1, 6, None), row(3, 2, 0.5, gold_edges=False)])
    assert out["edge_recall"] == 0.75 and out["edge_defined"] == pytest.approx(2 / 3)
    assert out["edge_recall_strict"] == 0.5  # items with gold edges: 1.0 and (undefined ->) 0.0
    assert out["count_ratio"] == 6 / 12 and out["items_with_pred_edges"] == pytest.approx(1 / 3)
    assert out["decoding"] == {"constrained": 3}


def test_every_variant_composes_and_the_exemplars_are_left_out(bench):
    from compllm.data.fanoutqa import fanoutqa_dev_path, load_fanoutqa_dev, without
    from compllm.models.errors import MissingPackageError

    for name, overrides in bench.VARIANTS.items():
        cfg = bench.compose(overrides)
        assert cfg.decomposer.model in cfg.models, name
    try:
        fanoutqa_dev_path()
    except MissingPackageError as exc:
        pytest.skip(str(exc))
    ids = bench.exemplar_ids()
    items = without(load_fanoutqa_dev(), ids)
    assert ids and not {i.id for i in items} & set(ids)
    with pytest.raises(AssertionError, match="partial run of other items"):
        bench.merged({"name": "free-0.5b", "seconds": 1.0, "items": [{"id": "x"}]}, items)
