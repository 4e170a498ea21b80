"""The `openai` backend against protocol faults a real server will not produce on demand: a tiny HTTP server on
127.0.0.1 that answers malformed JSON, empty choices, 500s and 429s, or stalls. (The real OpenAI-compatible
server, llama.cpp's, is exercised in tests/test_openai_server.py.)"""
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from compllm.backends.base import BackendError, GenerationRequest
from compllm.backends.openai_server import OpenAIServerModel, ServerConfig
from compllm.runtime.faults import RetryPolicy, generate_with_retry

OK = {"id": "x", "object": "chat.completion", "created": 0, "model": "m",
      "choices": [{"index": 0, "message": {"role": "assistant", "content": "Paris"}, "finish_reason": "stop"}],
      "usage": {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}}
CHOICE = {**OK, "choices": [{"index": 0, "message": {"role": "assistant", "content": "B"}, "finish_reason": "length",
                             "logprobs": {"content": [{"token": "B", "logprob": -0.9, "bytes": None, "top_logprobs": [
                                 {"token": "B", "logprob": -0.9, "bytes": None},
                                 {"token": " C", "logprob": -0.4, "bytes": None},
                                 {"token": "Z", "logprob": -0.1, "bytes": None}]}]}}]}


class Script:
    """What the fake server answers next: a list of (status, body or None to stall) consumed in order."""

    def __init__(self):
        self.replies: list = []
        self.seen: list = []
        self.lock = threading.Lock()


@pytest.fixture
def server():
    script = Script()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _reply(self, status, body):
            data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):  # /v1/models
            self._reply(200, {"object": "list", "data": [{"id": "m", "object": "model", "created": 0,
                                                          "owned_by": "t"}]})

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with script.lock:
                script.seen.append(body)
                status, reply = script.replies.pop(0) if script.replies else (200, OK)
            if reply is None:
                time.sleep(3)
                reply = OK
            self._reply(status, reply)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield script, f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()


def ask(text="Capital of France?", choices=()):
    return GenerationRequest(({"role": "user", "content": text},), 8, (), tuple(choices))


def model(url, **kw):
    return OpenAIServerModel("m", ServerConfig(base_url=url, model="m", **kw), alias="remote")


def call(m, requests, attempts=2, **policy):
    return generate_with_retry(lambda batch, cancel: m.generate(batch, cancel=cancel), requests,
                               RetryPolicy(attempts, backoff_s=0.0, **policy), "t")


@pytest.mark.parametrize("bad, reason", [
    ((200, "{not json"), "malformed response"),
    ((200, {**OK, "choices": []}), "returned no choices"),
    ((500, {"error": {"message": "boom"}}), "HTTP 500"),
    ((429, {"error": {"message": "slow down"}}), "HTTP 429"),
])
def test_a_protocol_fault_is_a_failed_attempt_and_the_retry_answers(server, bad, reason):
    script, url = server
    m = model(url)
    script.replies = [bad]
    (outcome,) = call(m, [ask()])
    assert outcome.ok and outcome.generation.text == "Paris" and outcome.attempts == 2
    script.replies = [bad, bad]
    (outcome,) = call(m, [ask()])
    assert not outcome.ok and reason in outcome.error and "'remote' at http://127.0.0.1:" in outcome.error


def test_a_stalled_server_times_out_as_a_timeout_fault(server):
    script, url = server
    script.replies = [(200, None)]
    (outcome,) = call(model(url, timeout_s=0.5), [ask()], attempts=1)
    assert not outcome.ok and outcome.error.startswith("TimeoutError") and "no answer within 0.5 s" in outcome.error


def test_choice_nodes_read_the_first_tokens_logprobs_over_the_option_letters(server):
    script, url = server
    script.replies = [(200, CHOICE)]
    (gen,) = model(url).generate([ask("Which? (A) x (B) y (C) z", "ABC")])
    assert gen.text == "C" and gen.output_tokens == 1  # " C" outranks "B"; "Z" is not an option
    sent = script.seen[-1]
    assert sent["max_tokens"] == 1 and sent["logprobs"] is True and sent["top_logprobs"] == 20
    script.replies = [(200, CHOICE)]
    (gen,) = model(url, logprobs=False).generate([ask("Which? (A) x (B) y", "AB")])
    assert gen.text == "B" and "logprobs" not in script.seen[-1]  # no log-probabilities: the one token it wrote


def test_rows_go_out_concurrently_but_never_more_than_the_steps_slots(server):
    script, url = server
    m = model(url)
    script.replies = [(200, None)] * 6  # every request stalls 3 s, so all in flight overlap
    start = time.perf_counter()
    gens = m.generate([ask(f"q{i}") for i in range(6)], max_live_rows=3)
    assert len(gens) == 6 and m.peak_in_flight == 3
    assert 5.5 < time.perf_counter() - start < 9  # two waves of three, not six one after another (18 s)


def test_a_port_with_nothing_listening_is_one_line_naming_the_alias_and_url():
    with pytest.raises(BackendError, match=r"model 'remote' at http://127.0.0.1:9/v1: cannot connect .* is the "
                                           r"server running\?"):
        model("http://127.0.0.1:9/v1")


def test_a_missing_api_key_variable_is_named(server, monkeypatch):
    _, url = server
    monkeypatch.delenv("COMPLLM_TEST_KEY", raising=False)
    with pytest.raises(BackendError, match="COMPLLM_TEST_KEY is not set"):
        model(url, api_key_env="COMPLLM_TEST_KEY")


def test_confidence_from_the_servers_logprobs(server):
    """A choice: the margin among the option letters' probabilities (a letter outside the top log-probs counts as
    0); text: exp(mean token log-prob) when the server returns log-probs, None when it does not."""
    import math

    script, url = server
    script.replies = [(200, CHOICE)]
    (gen,) = model(url).generate([ask("Which? (A) x (B) y (C) z", "ABC")])
    pb, pc = math.exp(-0.9), math.exp(-0.4)
    assert gen.choice_probs == pytest.approx((0.0, pb / (pb + pc), pc / (pb + pc)))
    assert gen.confidence == pytest.approx((pc - pb) / (pb + pc))
    text = {**OK, "choices": [{**OK["choices"][0], "logprobs": {"content": [
        {"token": "Par", "logprob": -0.2, "bytes": None, "top_logprobs": []},
        {"token": "is", "logprob": -0.4, "bytes": None, "top_logprobs": []}]}}]}
    script.replies = [(200, text)]
    (gen,) = model(url).generate([ask("Capital of France?", "")])
    assert gen.text == "Paris" and gen.confidence == pytest.approx(math.exp(-0.3))
    assert script.seen[-1]["logprobs"] is True
    script.replies = [(200, OK)]
    (gen,) = model(url, logprobs=False).generate([ask("Capital of France?", "")])
    assert gen.confidence is None and "logprobs" not in script.seen[-1]
