"""Cost model: formulas, roofline defaults, calibration round trip, and config errors."""
import json

import pytest

from compiler.cost import CostModel, ModelCost, admit_rows
from compiler.errors import ConfigError
from compiler.ir import Graph, Node, NodeKind
from compiler.verify import UnknownExpertError


def model() -> CostModel:
    return CostModel(
        {"a": ModelCost(1000, 10, 0.001, 0.01, call_overhead_s=0.5), "b": ModelCost(4000, 20, 0.002, 0.02, load_s=3.0)},
        {"law": "a", "aggregator": "b"},
    )


def test_node_kv_counts_prompt_output_and_parent_answers():
    cm = model()
    g = Graph()
    g.add(Node("p", NodeKind.SUBQUERY, "x", "law", est_prompt_tokens=5, est_output_tokens=7))
    g.add(Node("c", NodeKind.SUBQUERY, "y {#1}", "law", {"#1": "p"}, est_prompt_tokens=3))
    g.add(Node("z", NodeKind.SUBQUERY, "z", "law", est_prompt_tokens=3, est_output_tokens=0))
    assert cm.node_tokens(g.nodes["p"], g) == (5, 7)
    # c's prompt holds p's answer (7 tokens); no output estimate -> default_output_tokens; 0 means none
    assert cm.node_tokens(g.nodes["c"], g) == (3 + 7, cm.default_output_tokens)
    assert cm.node_tokens(g.nodes["z"], g) == (3, 0)
    assert cm.node_kv_bytes(g.nodes["p"], g) == (5 + 7) * 10


def test_batch_kv_is_left_padded_and_time_has_sublinear_decode():
    cm = model()
    tokens = [(10, 4), (2, 8)]
    assert cm.batch_kv_bytes("a", tokens) == 2 * (10 + 8) * 10
    assert cm.batch_kv_bytes("a", []) == 0
    # overhead + left-padded prefill (2 rows x longest prompt 10) + 4 steps at batch 2 (0.01 x 1.1), then the
    # shorter row has left the batch: 4 more steps at batch 1
    assert cm.batch_seconds("a", tokens) == pytest.approx(0.5 + 2 * 10 * 0.001 + 4 * 0.01 * 1.1 + 4 * 0.01)
    one = cm.batch_seconds("a", [(10, 8)]) - 0.5
    eight = cm.batch_seconds("a", [(10, 8)] * 8) - 0.5
    assert one < eight < 8 * one  # batching is cheaper than separate calls


def test_admit_rows_waits_for_half_the_slots_unless_nothing_is_live():
    assert admit_rows(free=8, pending=20, live=0) == 8  # an empty batch takes all it can
    assert admit_rows(free=3, pending=20, live=5) == 0  # 3 of 8 free: keep decoding
    assert admit_rows(free=4, pending=20, live=4) == 4  # half free: one prefill of 4 rows
    assert admit_rows(free=1, pending=1, live=7) == 1  # the last waiting row joins as soon as it fits
    assert admit_rows(free=0, pending=5, live=8) == 0
    assert admit_rows(free=8, pending=0, live=0) == 0


def test_refilled_call_keeps_the_batch_full_while_a_long_answer_decodes():
    """One long answer (100 steps) with three short ones behind it, 2 rows at a time: the short rows decode
    next to the long one instead of waiting for it, and KV is held for 2 rows, not 4."""
    cm = model()
    tokens = [(10, 100), (10, 5), (10, 5), (10, 5)]
    phases = cm.call_phases(tokens, slots=2)
    assert phases[0] == ([(10, 100), (10, 5)], 5, 2)  # the short row leaves after 5 steps
    assert [len(group) for group, _, _ in phases] == [2, 1, 1, 0]
    assert cm.decode_steps(tokens, slots=2) == 100  # all short rows rode along with the long one
    assert cm.decode_steps(tokens) == 100
    assert cm.batch_kv_bytes("a", tokens, slots=2) == 2 * (10 + 100) * 10
    # separate calls of 2 (what max_call_size=None plans): the second pair waits for the long row
    pairs = cm.batch_seconds("a", tokens[:2]) + cm.batch_seconds("a", tokens[2:])
    assert cm.batch_seconds("a", tokens, slots=2) < pairs
    # no cap = the all-at-once formula
    assert cm.batch_seconds("a", tokens, slots=4) == cm.batch_seconds("a", tokens)


def test_load_seconds_measured_or_from_bandwidth():
    cm = model()
    assert cm.load_seconds("b") == 3.0
    assert cm.load_seconds("a") == pytest.approx(1000 / cm.load_bytes_per_s)


def test_roofline_numbers():
    # a 0.5B-parameter bf16 model, 24 layers, 2 KV heads of 64 dims, 1 TB/s, 100 TFLOP/s
    mc = ModelCost.roofline(500_000_000, 2.0, 24, 2, 64, 1e12, 1e14)
    assert mc.weight_bytes == 1_000_000_000
    assert mc.kv_bytes_per_token == 2 * 24 * 2 * 64 * 2
    assert mc.prefill_s_per_token == pytest.approx(2 * 5e8 / 1e14)
    assert mc.decode_s_per_token == pytest.approx(1e9 / 1e12)  # memory bound: read every weight once
    with pytest.raises(ConfigError):
        ModelCost.roofline(0, 2.0, 24, 2, 64, 1e12, 1e14)


def test_calibration_round_trips_through_json():
    cm = model()
    data = json.loads(json.dumps(cm.to_dict()))
    back = CostModel.from_calibration(data)
    assert back == cm
    assert back.to_dict() == cm.to_dict()


def test_calibration_errors_name_the_problem():
    data = model().to_dict()
    with pytest.raises(ConfigError, match="unknown calibration keys: typo"):
        CostModel.from_calibration({**data, "typo": 1})
    bad = json.loads(json.dumps(data))
    bad["models"]["a"]["weigth_bytes"] = 1
    with pytest.raises(ConfigError, match="model 'a': unknown cost keys weigth_bytes"):
        CostModel.from_calibration(bad)
    with pytest.raises(ConfigError, match="version"):
        CostModel.from_calibration({**data, "version": 99})
    with pytest.raises(ConfigError, match="needs a 'models' mapping"):
        CostModel.from_calibration({"experts": {}})


def test_expert_on_unknown_model_and_unknown_expert():
    with pytest.raises(ConfigError, match="expert 'law' runs on model 'zzz'"):
        CostModel({"a": ModelCost(1, 1, 0, 0)}, {"law": "zzz"})
    with pytest.raises(ConfigError, match="non-negative"):
        ModelCost(-1, 1, 0, 0)
    with pytest.raises(UnknownExpertError, match="unknown expert 'astrology'"):
        model().model_of(Node("n", NodeKind.SUBQUERY, "x", "astrology"))


def test_measured_batch_steps_never_cost_more_than_row_by_row():
    """A table from a busy machine (batch 2 at 7x batch 1) must not make every batch look slower than its rows."""
    noisy = ModelCost(weight_bytes=1, kv_bytes_per_token=1, prefill_s_per_token=0.01, decode_s_per_token=0.4,
                      decode_step_s_by_batch={"1": 0.4, "2": 2.8, "4": 1.0, "8": 3.4})
    assert noisy.measured_step_seconds(1) == 0.4
    assert noisy.measured_step_seconds(2) == pytest.approx(0.8)  # clamped: two steps at batch 1
    assert noisy.measured_step_seconds(3) == pytest.approx(1.0)  # the batch-4 measurement, below 3 x 0.4
    assert noisy.measured_step_seconds(8) == pytest.approx(3.2)
    assert noisy.measured_step_seconds(16) == pytest.approx(6.4)  # past the table: per-row cost of batch 8
    cost = CostModel(models={"m": noisy}, expert_model={"e": "m"})
    together = cost.batch_seconds("m", [(10, 5), (10, 5)])
    assert together <= 2 * cost.batch_seconds("m", [(10, 5)])
