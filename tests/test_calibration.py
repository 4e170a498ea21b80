"""Calibration without a real model: noise verdicts, storing or refusing, the lock, garbled files, the re-check,
estimates from a model's files. A fake probe stands in for the model, a fake CPU meter for the machine."""
from __future__ import annotations

import json
import logging
import struct
import threading
import time
from dataclasses import dataclass, field

import pytest

from compiler.cost import CostModel, ModelCost
from compiler.plan import Plan, Step, StepKind
from compllm.calibration import (
    CalibrationStore,
    ModelFacts,
    ModelInfo,
    Protocol,
    build_cost_model,
    calibrate,
    model_facts,
    recheck_calibration,
)
from compllm.calibration import measure
from compllm.models.cache import write_checked_json
from compllm.calibration.measure import PREFILL, Round, judge, run_rounds, step_key
from compllm.runtime.trace import StepRecord

FAST = Protocol(prompt_tokens=4, decode_steps=1, batch_sizes=(1, 2, 4), min_rounds=3, max_rounds=6, warmup=False)
QUIET = {PREFILL: 0.005, step_key(1): 0.050, step_key(2): 0.060, step_key(4): 0.080}


class FakeProbe:
    """Per-round timings from a script: round r uses `script[min(r, len(script) - 1)]`, scaled per quantity."""

    def __init__(self, script: list[dict[str, float]] | None = None, sleep: float = 0.0):
        self.script = script or [QUIET]
        self.calls = 0
        self.rounds = 0
        self.sleep = sleep
        self.memory_calls = 0

    def _value(self, key: str) -> float:
        time.sleep(self.sleep)
        self.calls += 1
        return self.script[min(self.rounds, len(self.script) - 1)][key]

    def prefill_seconds(self, rows: int, tokens: int) -> float:
        return self._value(PREFILL) * tokens

    def decode_step_seconds(self, rows: int, prompt_tokens: int, steps: int) -> float:
        value = self._value(step_key(rows))
        if rows == max(FAST.batch_sizes):
            self.rounds += 1
        return value

    def prefill_memory(self, rows: int, tokens: int) -> tuple[float, float]:
        self.memory_calls += 1
        return 90_000.0, 12_288.0


@pytest.fixture
def quiet_cpu(monkeypatch):
    """The machine is quiet unless a test says otherwise (others' CPU share per round from a list)."""
    shares: list[float] = []

    class Meter:
        @classmethod
        def start(cls):
            return cls()

        def others_share(self):
            return shares.pop(0) if shares else 0.0

    monkeypatch.setattr(measure, "CpuMeter", Meter)
    return shares


def scaled(factor: float, **only: float) -> dict[str, float]:
    return {k: v * only.get(k.replace("@", "_"), factor) for k, v in QUIET.items()}


def rounds_of(*values: dict[str, float], others: float | None = 0.0) -> list[Round]:
    return [Round(dict(v), others, 1.0) for v in values]


# --- the verdict -------------------------------------------------------------------------------------------------
def test_good_rounds_pass_and_keep_the_minimum():
    verdict = judge(rounds_of(QUIET, scaled(1.2), scaled(1.1), scaled(3.0)), FAST)  # one slow round is tolerated
    assert verdict.ok, verdict.reason
    assert verdict.values == QUIET and verdict.spread == pytest.approx(1.2)


def test_rounds_that_disagree_are_refused():
    verdict = judge(rounds_of(QUIET, scaled(2.0), scaled(2.5)), FAST)
    assert not verdict.ok and "differ by 2.50x" in verdict.reason


def test_a_batch_step_dearer_than_its_rows_one_by_one_is_refused():
    table = {**QUIET, step_key(2): 0.120}  # batch 2 at 2.4x batch 1: the busy-machine signature
    verdict = judge(rounds_of(table, table, table), FAST)
    assert not verdict.ok and "batch 2" in verdict.reason and "dearer" in verdict.reason


def test_a_batch_step_at_exactly_its_rows_cost_is_real_not_noise():
    table = {**QUIET, step_key(2): 2.01 * QUIET[step_key(1)]}  # measured quiet: batch 1 has a gemv fast path
    assert judge(rounds_of(table, table, table), FAST).ok


def test_rounds_on_a_busy_machine_are_refused_even_when_they_agree():
    verdict = judge(rounds_of(QUIET, QUIET, QUIET, others=0.6), FAST)  # a steady job slows every round alike
    assert not verdict.ok and "0 of 3 rounds ran on a quiet machine" in verdict.reason and "60%" in verdict.reason


def test_noisy_rounds_get_more_rounds_then_a_refusal(quiet_cpu):
    probe = FakeProbe([QUIET, scaled(2.0), scaled(1.0, step_4=3.0)] * 3)
    extra = []
    verdict = run_rounds(probe, FAST, on_extra_round=extra.append)
    assert not verdict.ok and verdict.rounds == FAST.max_rounds and extra == [4, 5, 6]


def test_noise_that_stops_is_measured_through(quiet_cpu):
    quiet_cpu.extend([0.9, 0.0, 0.0, 0.0])  # the first round ran next to another job
    verdict = run_rounds(FakeProbe([scaled(4.0), QUIET]), FAST)
    assert verdict.ok and verdict.rounds == 4 and verdict.clean_rounds == 3 and verdict.values == QUIET


def test_a_busy_machine_is_given_up_at_the_time_limit(quiet_cpu):
    protocol = Protocol(**{**FAST.__dict__, "max_seconds": 0.05})
    start = time.perf_counter()
    verdict = run_rounds(FakeProbe(sleep=0.02), protocol)
    assert time.perf_counter() - start < 0.5
    assert not verdict.ok and ("limit" in verdict.reason or "busy" in verdict.reason)


# --- calibrate(): store or refuse, lock ----------------------------------------------------------------------
FACTS = ModelFacts(params=1000, largest_tensor_file_bytes=400, layers=2, kv_heads=1, head_dim=4, hidden=8,
                   intermediate=16, tokenizer_file_bytes=10)


@dataclass
class FakeStats:
    load_seconds: float = 0.5


@dataclass
class FakeModel:
    name: str = "fake"
    device: str = "cpu"
    dtype: str = "float32"
    weight_bytes: int = 4000
    stats: FakeStats = field(default_factory=FakeStats)


class FakePool:
    def __init__(self):
        self.model = FakeModel()
        self.cache_dir = None

    def get(self, alias):
        return self.model

    def loaded(self):
        return {"m": self.model}


INFO = ModelInfo("m", "fake|cpu|float32|weight-major", "cpu", "float32", None, FACTS)


def test_good_measurement_is_stored_with_memory(tmp_path, quiet_cpu):
    store = CalibrationStore(str(tmp_path))
    result = calibrate(FakePool(), INFO, store, FAST, progress=False, probe_of=lambda m: FakeProbe())
    assert result.stored and result.cost.prefill_s_per_token == QUIET[PREFILL]
    assert result.cost.decode_step_s_by_batch == {"1": 0.05, "2": 0.06, "4": 0.08}
    assert result.cost.workspace_bytes_per_token == 90_000.0 and result.cost.kv_bytes_per_token == 12_288
    entry = store.get(INFO.key)
    assert entry is not None and entry.cost == result.cost and entry.meta["protocol"] == 2


def test_noisy_measurement_is_not_stored_and_warns_once(tmp_path, quiet_cpu, caplog):
    store = CalibrationStore(str(tmp_path))
    probe = FakeProbe([scaled(1.0, step_2=3.0)])  # batch 2 always dearer than two batch-1 steps
    with caplog.at_level(logging.WARNING):
        result = calibrate(FakePool(), INFO, store, FAST, progress=False, probe_of=lambda m: probe)
    assert not result.stored and store.get(INFO.key) is None and not store.path.exists()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "not storing the calibration of fake|cpu|float32" in warnings[0]
    assert "roofline" in warnings[0] and "auto_calibrate=false" in warnings[0]
    assert result.cost.decode_step_s_by_batch is None  # roofline timings this run, not the noisy ones
    assert probe.memory_calls == 0  # a refused run spares the machine the memory prefill


def test_two_calibrations_at_once_measure_once(tmp_path, quiet_cpu, caplog):
    store_dir = str(tmp_path)
    probes: list[FakeProbe] = []
    started = threading.Event()

    def probe_of(model):
        probes.append(FakeProbe(sleep=0.01))
        started.set()
        return probes[-1]

    results = []
    threads = [threading.Thread(target=lambda: results.append(
        calibrate(FakePool(), INFO, CalibrationStore(store_dir), FAST, progress=False, probe_of=probe_of)))
        for _ in range(2)]
    with caplog.at_level(logging.INFO):
        threads[0].start()
        started.wait(5)  # the first one holds the lock and measures; the second must wait for it
        threads[1].start()
        for t in threads:
            t.join()
    assert "waiting for another process calibrating" in caplog.text
    assert len(probes) == 1 and len(results) == 2
    assert results[0].cost == results[1].cost
    assert sorted(r.note for r in results) == ["", "measured by another process"]


# --- the file ----------------------------------------------------------------------------------------------
def test_garbled_file_is_ignored_then_replaced(tmp_path, caplog):
    store = CalibrationStore(str(tmp_path))
    store.path.write_text('{"fake|cpu": {"weight_bytes": 12', encoding="utf-8")
    with caplog.at_level(logging.WARNING):
        assert store.entries() == {}
    assert "it is not JSON" in caplog.text
    cost = ModelCost(100, 10, 0.001, 0.01)
    store.save("k", cost)
    assert store.get("k").cost == cost


def test_a_file_whose_bytes_changed_fails_its_checksum_and_is_measured_again(tmp_path, caplog):
    store = CalibrationStore(str(tmp_path))
    store.save("k", ModelCost(100, 10, 0.001, 0.01))
    store.path.write_text(store.path.read_text(encoding="utf-8").replace('"weight_bytes": 100', '"weight_bytes": 900'),
                          encoding="utf-8")  # valid JSON, wrong numbers: a silent wrong plan unless checked
    with caplog.at_level(logging.WARNING):
        assert store.entries() == {}
    assert "checksum" in caplog.text or "sha256" in caplog.text


def test_garbled_entry_is_ignored_and_old_entries_are_measured_again(tmp_path, caplog):
    store = CalibrationStore(str(tmp_path))
    good = {"weight_bytes": 100, "kv_bytes_per_token": 10, "prefill_s_per_token": 0.001, "decode_s_per_token": 0.01}
    write_checked_json(store.path, {
        "good": {**good, "protocol": 2},
        "negative": {**good, "decode_s_per_token": -1, "protocol": 2},
        "wrong type": {**good, "weight_bytes": "lots", "protocol": 2},
        "not a dict": [1, 2],
        "old": good,  # protocol 1: no memory numbers
    })
    with caplog.at_level(logging.WARNING):
        assert list(store.entries()) == ["good"]
    assert caplog.text.count("ignoring") == 3
    assert store.previous("old") == ModelCost(**good)  # its timings can still stand in for a refused run


# --- the re-check after a run ------------------------------------------------------------------------------
def plan_and_records(ratio: float, steps: int = 3) -> tuple[Plan, list[StepRecord]]:
    plan_steps = [Step(f"gen:m#{i}", StepKind.GENERATE, "m", (f"n{i}",), est_s=2.0) for i in range(steps)]
    records = [StepRecord(s.id, "generate", "m", 0, 10.0 * i, 10.0 * i + 2.0 * ratio) for i, s in enumerate(plan_steps)]
    return Plan(plan_steps, None, {}), records


def stored_cost_model(tmp_path) -> tuple[CalibrationStore, CostModel]:
    store = CalibrationStore(str(tmp_path))
    cost = ModelCost(100, 10, 0.001, 0.01, decode_step_s_by_batch={"1": 0.01})
    store.save("M|cpu|float32|weight-major", cost)
    store.save("other|cpu|float32|weight-major", ModelCost(200, 10, 0.002, 0.02))
    return store, CostModel({"m": store.get("M|cpu|float32|weight-major").cost}, {"e": "m"})


def test_recheck_drops_an_entry_the_run_contradicts(tmp_path, caplog):
    store, cost_model = stored_cost_model(tmp_path)
    plan, records = plan_and_records(ratio=5.0)
    with caplog.at_level(logging.WARNING):
        warnings = recheck_calibration(str(tmp_path), plan, records, cost_model)
    assert len(warnings) == 1 and "model m" in warnings[0] and "5.00x" in warnings[0]
    assert list(store.entries()) == ["other|cpu|float32|weight-major"]


@pytest.mark.parametrize("ratio,steps,others", [(1.5, 3, None), (0.5, 3, None), (5.0, 2, None), (5.0, 3, 0.8)])
def test_recheck_keeps_entries_within_bounds_or_without_evidence(tmp_path, ratio, steps, others):
    store, cost_model = stored_cost_model(tmp_path)
    plan, records = plan_and_records(ratio, steps)
    assert recheck_calibration(str(tmp_path), plan, records, cost_model, others_cpu=others) == []
    assert len(store.entries()) == 2


def test_recheck_leaves_entries_it_did_not_use(tmp_path):
    store, _ = stored_cost_model(tmp_path)
    plan, records = plan_and_records(ratio=10.0)
    roofline = CostModel({"m": ModelCost(100, 10, 0.5, 0.5)}, {"e": "m"})
    assert recheck_calibration(str(tmp_path), plan, records, roofline) == []
    assert len(store.entries()) == 2


# --- estimates from the files, without loading ---------------------------------------------------------------
def write_model_dir(directory, vocab=32, hidden=8, layers=2):
    directory.mkdir(parents=True, exist_ok=True)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
              "intermediate_size": 16, "num_attention_heads": 2, "num_key_value_heads": 1,
              "num_hidden_layers": layers, "vocab_size": vocab}
    (directory / "config.json").write_text(json.dumps(config))
    tensors, offset = {}, 0
    for name, shape in [("model.embed_tokens.weight", [vocab, hidden]), ("model.norm.weight", [hidden])]:
        size = 2 * shape[0] * (shape[1] if len(shape) > 1 else 1)
        tensors[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    header = json.dumps({"__metadata__": {"format": "pt"}, **tensors}).encode()
    (directory / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(offset))
    (directory / "tokenizer.json").write_text("{}")
    return directory


def test_model_facts_read_headers_not_weights(tmp_path):
    facts = model_facts(write_model_dir(tmp_path / "m"))
    assert facts.params == 32 * 8 + 8 and facts.largest_tensor_file_bytes == 32 * 8 * 2
    assert (facts.layers, facts.kv_heads, facts.head_dim) == (2, 1, 4)
    assert facts.kv_bytes_per_token("float32") == 2 * 2 * 1 * 4 * 4
    assert facts.weight_bytes("float32") >= facts.params * 4


def test_uncalibrated_model_gets_estimates_without_loading(tmp_path, monkeypatch):
    from compllm.backends import weights
    from compllm.backends.pool import ModelPool

    def refuse(self, alias):
        raise AssertionError("estimates must not load the weights")

    monkeypatch.setattr(ModelPool, "_load", refuse)
    monkeypatch.setattr(weights, "model_class", lambda path: None)  # importing model code: seconds, not tested here
    directory = write_model_dir(tmp_path / "m")
    pool = ModelPool({"m": {"name": "tiny", "dtype": "float32", "device": "cpu",
                            "source": {"_target_": "compllm.models.HFSource", "path": str(directory)}}})
    cost_model = build_cost_model(pool, {"law": "m", "aggregator": "m"}, str(tmp_path), auto_calibrate=False)
    mc = cost_model.cost("m")
    assert mc.weight_bytes >= (32 * 8 + 8) * 4 and mc.kv_bytes_per_token == 64
    assert mc.workspace_bytes_per_token > 0 and mc.load_extra_bytes == 32 * 8 * 2
    assert cost_model.base_bytes > 0 and cost_model.expert_model == {"law": "m", "aggregator": "m"}
