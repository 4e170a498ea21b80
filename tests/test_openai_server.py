"""The `openai` backend against a real OpenAI-compatible server on 127.0.0.1 (llama.cpp's, serving the shipped
SmolLM2-135M GGUF): the whole pipeline through it, `choice` nodes from logprobs, rows capped at the step's slots,
and the faults a real server produces: killed mid-call and restarted, nothing listening, too slow."""
import json
import threading
import time

import pytest

pytest.importorskip("llama_cpp.server.app", reason="llama-cpp-python[server] is not installed (`make setup`)")

from compllm.backends.base import BackendError, GenerationRequest  # noqa: E402
from compllm.backends.openai_server import OpenAIServerModel, ServerConfig  # noqa: E402
from compllm.runtime.faults import RetryPolicy, generate_with_retry  # noqa: E402
from llama_server import SERVED_NAME, free_port, llama_server, smollm2_gguf  # noqa: E402

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def server(model_cache, tmp_path_factory):
    log = tmp_path_factory.mktemp("llama_server") / "server.log"
    with llama_server(smollm2_gguf(model_cache), log=log) as s:
        yield s


def remote(url, **kw) -> OpenAIServerModel:
    return OpenAIServerModel(SERVED_NAME, ServerConfig(base_url=url, model=SERVED_NAME, **kw), alias="remote")


def ask(text, tokens=16, choices=()):
    return GenerationRequest(({"role": "user", "content": text},), tokens, (), tuple(choices))


def test_the_pipeline_answers_a_compound_query_through_the_server(server, tmp_path, model_cache):
    from test_cli import compllm

    proc = compllm("Which vitamin prevents scurvy, and what is 15% of 240?", "model=llamacpp-server",
                   f"models.default.server.base_url={server.url}", f"models.default.server.model={SERVED_NAME}",
                   "show_progress=false", cwd=tmp_path, env={"COMPLLM_CACHE": model_cache}, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (result,) = (tmp_path / "outputs").glob("*/*/result.json")
    payload = json.loads(result.read_text())
    (q,) = payload["queries"]
    assert q["final_answer"].strip() and all(n["status"] == "ok" for n in q["nodes"])
    assert payload["models"]["default"]["calls"] >= 2  # the planner's call and the experts' step(s)
    assert payload["memory"]["planned_peak_bytes"] <= payload["memory"]["measured_peak_bytes"] * 2


def test_choice_nodes_are_scored_from_the_first_tokens_logprobs(server):
    m = remote(server.url)
    question = "Which organ makes insulin? Options: (A) liver (B) pancreas (C) heart (D) lung. Answer with the letter."
    (gen,) = m.generate([ask(question, choices="ABCD")])
    assert gen.text in "ABCD" and len(gen.text) == 1 and gen.output_tokens == 1 and gen.prompt_tokens > 10


def test_rows_are_sent_concurrently_up_to_the_steps_slots(server):
    m = remote(server.url)
    gens = m.generate([ask(f"Count to {i}.", 6) for i in range(1, 6)], max_live_rows=2)
    assert len(gens) == 5 and all(g.text for g in gens) and m.peak_in_flight == 2


def test_a_server_killed_mid_call_fails_the_attempt_and_a_restarted_one_answers(model_cache, tmp_path):
    gguf = smollm2_gguf(model_cache)
    port = free_port()
    with llama_server(gguf, port, tmp_path / "server.log") as s:
        m = remote(s.url, timeout_s=60)
        threading.Timer(1.0, s.kill).start()
        (outcome,) = generate_with_retry(lambda b, c: m.generate(b, cancel=c),
                                         [ask("Write a long story about a dragon.", 300)],
                                         RetryPolicy(1, backoff_s=0.0), "t")
        assert not outcome.ok and "BackendError" in outcome.error and s.url in outcome.error
        s.start()  # the same port again: the next attempt reaches it
        (outcome,) = generate_with_retry(lambda b, c: m.generate(b, cancel=c), [ask("Say hi.", 4)],
                                         RetryPolicy(1, backoff_s=0.0), "t")
        assert outcome.ok and outcome.generation.text


def test_nothing_listening_on_the_port_is_one_line_at_load_time():
    port = free_port()
    with pytest.raises(BackendError, match=rf"model 'remote' at http://127.0.0.1:{port}/v1: cannot connect"):
        remote(f"http://127.0.0.1:{port}/v1")


def test_a_response_slower_than_the_timeout_is_a_timeout_fault(server):
    m = remote(server.url, timeout_s=0.3)
    start = time.perf_counter()
    (outcome,) = generate_with_retry(lambda b, c: m.generate(b, cancel=c), [ask("Write a long story.", 300)],
                                     RetryPolicy(1, backoff_s=0.0), "t")
    assert not outcome.ok and outcome.error.startswith("TimeoutError") and time.perf_counter() - start < 10


def test_calibrate_measures_the_server_from_the_client_and_the_compiler_plans_with_it(server, tmp_path):
    """Latency vs requests in flight against the real server (llama-cpp-python's bundled server runs one request at
    a time, so the per-token time a client sees grows with concurrency); the cost model holds no local memory for
    it, caps a call's requests in flight at the server's concurrency, and `explain` names the calibration."""
    from compiler import compile
    from compiler.build import RoutedSubQuery as Sq, add_query
    from compiler.cost import CostModel, Engine
    from compiler.explain import explain_text
    from compiler.ir import Graph
    from compllm.calibration.engines import remote_note
    from compllm.calibration.remote import calibrate_remote

    result = calibrate_remote(remote(server.url, max_concurrency=4), concurrency=(1, 4), prompt_tokens=96,
                              new_tokens=12, repeats=1)
    cost = result.cost
    assert cost.weight_bytes == 0 and cost.kv_bytes_per_token == 0 and result.prompt_tokens > 60
    assert 0 < cost.prefill_s_per_token < 0.1 and set(cost.decode_step_s_by_batch) == {"1", "4"}
    steps = cost.decode_step_s_by_batch
    assert steps["4"] > 2 * steps["1"], f"a serialising server: 4 in flight should be ~4x slower per token: {steps}"
    assert result.latency_s_by_concurrency["4"] > result.latency_s_by_concurrency["1"]
    spec = {"backend": "openai", "server": {"base_url": server.url, "model": SERVED_NAME, "max_concurrency": 4}}

    class Pool:  # what engine_cost reads of a model pool
        def spec(self, alias):
            return spec
    from compllm.calibration import CalibrationStore
    from compllm.calibration.build import engine_cost, remote_key
    store = CalibrationStore(str(tmp_path))
    store.save(remote_key(spec), cost, rounds=1)
    assert engine_cost(Pool(), "srv", store, auto_calibrate=False) == cost  # the next run plans with it
    cm = CostModel({"srv": cost}, {"general": "srv", "aggregator": "srv"},
                   engines={"srv": Engine("openai", True, 4, left_padded=False, note=remote_note(spec, cost))})
    g = Graph()
    add_query(g, "q0", "Six things?", [Sq(i, f"Question {i}?", (), "general", max_new_tokens=8) for i in range(1, 7)],
              "aggregator", 16)
    plan = compile(g, cm)
    gens = [s for s in plan.steps if s.kind.value == "generate"]
    assert all(s.slots and s.slots <= 4 for s in gens if len(s.nodes) > 4) and plan.peak_planned_bytes == 0
    text = explain_text(g, plan)
    assert f"srv=openai, prefix cache, server, 4 concurrent requests, at {server.url}, calibrated" in text
