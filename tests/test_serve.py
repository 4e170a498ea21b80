"""task=serve: the real server (a `compllm task=serve` subprocess on 127.0.0.1 running SmolLM2-135M) through
the official `openai` client and raw HTTP, plus the app's request checks and the metrics text in-process."""
import json
import threading
import time

import httpx
import pytest

from compllm.serve.app import create_app
from compllm.serve.config import ServeConfig
from compllm.serve.errors import APIError
from compllm.serve.launch import ServerProcess, metric
from compllm.serve.metrics import Histogram, Metrics
from compllm.serve.schemas import ChatRequest
from compllm.serve.service import Service

openai = pytest.importorskip("openai")

NAME = "compllm-team"
KEY_ENV = "COMPLLM_TEST_SERVE_KEY"
QUESTION = "What is the capital of France? And which vitamin prevents scurvy?"


def ask(text=QUESTION):
    return [{"role": "user", "content": text}]


def client(server, key="unused", timeout=300.0):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, timeout=timeout)


# --------------------------------------------------------------------------- fast: the app in-process, no model


@pytest.fixture
def app_client(monkeypatch):
    """The real app over a service whose pipe is not prepared: every check before the pipe runs is exercised."""
    from fastapi.testclient import TestClient

    monkeypatch.delenv("COMPLLM_API_KEY", raising=False)
    return TestClient(create_app(Service(None, ServeConfig(max_body_bytes=1000))))


def post(c, body, **kw):
    return c.post("/v1/chat/completions", content=body if isinstance(body, (bytes, str)) else json.dumps(body), **kw)


@pytest.mark.parametrize("body,status,param,code", [
    ({}, 400, "messages", "missing_required_parameter"),
    ({"model": NAME}, 400, "messages", "missing_required_parameter"),
    ({"model": NAME, "messages": "hi"}, 400, "messages", "invalid_value"),
    ({"model": NAME, "messages": [{"role": "user", "content": 5}]}, 400, "messages.0.content", "invalid_value"),
    ({"model": NAME, "messages": ask(), "stream": "yes"}, 400, "stream", "invalid_value"),
    ({"model": 3, "messages": ask()}, 400, "model", "invalid_value"),
    ({"model": NAME, "messages": [{"role": "system", "content": "be brief"}]}, 400, "messages",
     "missing_user_message"),
    ("{not json", 400, None, "invalid_json"),
    ("[1, 2]", 400, None, "invalid_json"),
    ("x" * 2000, 413, None, "request_too_large"),
    ({"model": "gpt-4o", "messages": ask()}, 404, "model", "model_not_found"),
])
def test_serve_app_refuses_bad_requests_openai_style(app_client, body, status, param, code):
    r = post(app_client, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["param"] == param and err["code"] == code
    assert err["message"]


def test_serve_app_says_which_model_exists_and_is_not_ready_before_the_pipe(app_client):
    assert NAME in post(app_client, {"model": "x", "messages": ask()}).json()["error"]["message"]
    r = post(app_client, {"model": NAME, "messages": ask()})
    assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready" and r.headers["retry-after"]
    assert app_client.get("/healthz").status_code == 503
    assert app_client.get("/v1/models").json()["data"][0]["id"] == NAME
    assert app_client.get("/nope").json()["error"]["code"] == "404"


def test_serve_app_requires_the_configured_key(monkeypatch):
    from fastapi.testclient import TestClient

    monkeypatch.setenv(KEY_ENV, "s3cret")
    c = TestClient(create_app(Service(None, ServeConfig(api_key_env=KEY_ENV))))
    assert c.get("/v1/models").status_code == 401
    assert c.get("/v1/models", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert c.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    monkeypatch.setenv(KEY_ENV, "")  # an empty variable: no key required
    c = TestClient(create_app(Service(None, ServeConfig(api_key_env=KEY_ENV))))
    assert c.get("/v1/models", headers={"Authorization": "Bearer anything"}).status_code == 200


def test_serve_query_is_the_last_user_message():
    req = ChatRequest.model_validate({"model": NAME, "messages": [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "first"},
        {"role": "assistant", "content": "ok"}, {"role": "user", "content": [{"type": "text", "text": "second"}]}]})
    assert req.query() == ("second", 3)
    with pytest.raises(APIError, match="empty"):
        ChatRequest.model_validate({"model": NAME, "messages": [{"role": "user", "content": "  "}]}).query()


def test_serve_metrics_text_is_prometheus_exposition():
    m = Metrics(lambda: 2, lambda: 1, lambda: 7)
    m.requests.inc(path="/v1/chat/completions", code="200")
    m.node_ended("math", "default", "ok", "", 10, 3)
    m.node_ended("math", "default", "skipped", "cancelled", 0, 0)
    m.latency.observe(0.3, code="200")
    m.latency.observe(7.0, code="200")
    text = m.render()
    assert metric(text, "compllm_requests_total", path="/v1/chat/completions", code="200") == 1
    assert metric(text, "compllm_nodes_executed_total", expert="math", status="ok") == 1
    assert metric(text, "compllm_nodes_cancelled_total") == 1
    assert metric(text, "compllm_tokens_total", model="default", kind="prompt") == 10
    assert metric(text, "compllm_queue_depth") == 2 and metric(text, "compllm_plan_increments_total") == 7
    assert metric(text, "compllm_request_latency_seconds_bucket", code="200", le="0.5") == 1
    assert metric(text, "compllm_request_latency_seconds_bucket", code="200", le="+Inf") == 2
    assert metric(text, "compllm_request_latency_seconds_count", code="200") == 2
    assert "# TYPE compllm_request_latency_seconds histogram" in text


def test_serve_histogram_buckets_are_cumulative_and_label_values_escaped():
    h = Histogram("x", "h", (1.0, 2.0))
    for v in (0.5, 1.0, 1.5, 3.0):
        h.observe(v, who='a"b')
    lines = list(h.render())
    assert 'x_bucket{who="a\\"b",le="1"} 2' in lines and 'x_bucket{who="a\\"b",le="2"} 3' in lines
    assert 'x_bucket{who="a\\"b",le="+Inf"} 4' in lines


# --------------------------------------------------------------------------- the real server


@pytest.fixture(scope="module")
def server(tmp_path_factory, model_cache):
    log = tmp_path_factory.mktemp("serve") / "server.log"
    s = ServerProcess(["model=smollm2-135m", f"cache_dir={model_cache}", "serve.max_concurrent=4",
                       "serve.api_key_env=null"], log).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def strict_server(tmp_path_factory, model_cache):
    """One place, no queue, a 1 s deadline, an API key."""
    log = tmp_path_factory.mktemp("serve_strict") / "server.log"
    s = ServerProcess(["model=smollm2-135m", f"cache_dir={model_cache}", "serve.max_concurrent=1",
                       "serve.max_queue=0", "serve.request_timeout_s=1.0", f"serve.api_key_env={KEY_ENV}"], log,
                      env={KEY_ENV: "s3cret"}).start()
    yield s
    s.stop()


@pytest.mark.model
def test_server_lists_its_deployment_and_is_healthy(server):
    assert server.health() == (200, {"status": "ok", "model": NAME})
    assert [m.id for m in client(server).models.list()] == [NAME]


@pytest.mark.model
def test_server_answers_through_the_openai_client(server):
    done = client(server).chat.completions.create(model=NAME, messages=ask())
    answer = done.choices[0].message.content
    assert answer.strip() and not answer.startswith("(no answer") and done.choices[0].finish_reason == "stop"
    assert done.object == "chat.completion" and done.model == NAME and done.id.startswith("chatcmpl-")
    ext = done.model_extra["compllm"]
    assert ext["parts"] and all(p["status"] == "ok" for p in ext["parts"])
    assert done.usage.prompt_tokens > 50 and done.usage.completion_tokens > 0  # planner row + experts
    assert done.usage.total_tokens == done.usage.prompt_tokens + done.usage.completion_tokens


@pytest.mark.model
def test_server_streams_the_answer_with_opt_in_progress(server):
    chunks = list(client(server).chat.completions.create(model=NAME, messages=ask(), stream=True,
                                                         stream_options={"include_usage": True},
                                                         extra_body={"compllm_progress": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finished = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finished) == 1 and finished[0].choices[0].finish_reason == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    progress = [c.model_extra["compllm"] for c in chunks if (c.model_extra or {}).get("compllm")]
    parts = [p for p in progress if p["event"] == "part"]
    assert parts and progress[-1]["event"] == "done"
    assert text.strip() and all(p["answer"] in text for p in progress[-1]["parts"])  # joined: every part's answer
    standard = list(client(server).chat.completions.create(model=NAME, messages=ask("What is 2 + 2?"), stream=True))
    assert not any((c.model_extra or {}).get("compllm") for c in standard)  # no extension unless asked for
    assert "".join(c.choices[0].delta.content or "" for c in standard if c.choices).strip()


@pytest.mark.model
def test_server_runs_concurrent_requests_in_one_plan(server):
    before = metric(server.metrics(), "compllm_plan_increments_total")
    out = {}

    def one(i, text):
        out[i] = client(server).chat.completions.create(model=NAME, messages=ask(text)).model_extra["compllm"]

    threads = [threading.Thread(target=one, args=(i, t)) for i, t in
               enumerate(["What is the boiling point of water?", "Who wrote Hamlet?"])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    a, b = out[0], out[1]
    assert a["query_id"] != b["query_id"]
    # their planner rows (and parts) ran at the same time in one running plan; the request answered last sees
    # the other's calls complete (the first may be answered while the other's planner call still runs)
    assert b["query_id"] in a["overlapping_queries"] or a["query_id"] in b["overlapping_queries"]
    assert metric(server.metrics(), "compllm_plan_increments_total") >= before + 2


@pytest.mark.model
def test_server_refuses_malformed_requests(server):
    url = f"{server.url}/v1/chat/completions"
    assert httpx.post(url, json={}).json()["error"]["param"] == "messages"
    assert httpx.post(url, json={"model": NAME, "messages": [{"role": "user"}]}).status_code == 400
    assert httpx.post(url, content=b"{oops", headers={"content-type": "application/json"}).status_code == 400
    big = {"model": NAME, "messages": ask("x" * (2 << 20))}
    assert httpx.post(url, json=big, timeout=60).status_code == 413
    with pytest.raises(openai.NotFoundError, match=NAME):
        client(server).chat.completions.create(model="gpt-4o", messages=ask())
    with pytest.raises(openai.BadRequestError):
        client(server).chat.completions.create(model=NAME, messages=[{"role": "user", "content": 5}])


@pytest.mark.model
def test_server_cancels_the_query_of_a_client_that_went_away(server):
    before = metric(server.metrics(), "compllm_nodes_cancelled_total")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/chat/completions", timeout=httpx.Timeout(60, read=0.5),
                   json={"model": NAME, "messages": ask("Name three rivers in Europe, then say which is longest.")})
    deadline = time.time() + 120
    while metric(server.metrics(), "compllm_nodes_cancelled_total") <= before and time.time() < deadline:
        time.sleep(0.5)
    text = server.metrics()
    assert metric(text, "compllm_nodes_cancelled_total") > before
    assert metric(text, "compllm_requests_total", path="/v1/chat/completions", code="499") >= 1
    assert client(server).chat.completions.create(model=NAME, messages=ask("What is 3 + 4?")).choices[0]


@pytest.mark.model
def test_server_wants_the_api_key(strict_server):
    with pytest.raises(openai.AuthenticationError, match="wrong API key"):
        client(strict_server, key="nope").models.list()
    r = httpx.get(f"{strict_server.url}/v1/models")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert [m.id for m in client(strict_server, key="s3cret").models.list()] == [NAME]


@pytest.mark.model
def test_server_past_the_deadline_is_504_with_the_partial_answer(strict_server):
    r = httpx.post(f"{strict_server.url}/v1/chat/completions", headers={"Authorization": "Bearer s3cret"},
                   json={"model": NAME, "messages": ask()}, timeout=60)
    assert r.status_code == 504, r.text
    body = r.json()
    assert body["error"]["code"] == "deadline_exceeded" and "request_timeout_s=1" in body["error"]["message"]
    assert body["partial"] is True and isinstance(body["partial_answer"], str)


@pytest.mark.model
def test_server_with_a_full_queue_is_429(strict_server):
    first = {}
    t = threading.Thread(target=lambda: first.setdefault("r", httpx.post(
        f"{strict_server.url}/v1/chat/completions", headers={"Authorization": "Bearer s3cret"},
        json={"model": NAME, "messages": ask()}, timeout=60)))
    t.start()
    time.sleep(0.4)  # the first request holds the one place for its 1 s deadline
    with pytest.raises(openai.RateLimitError, match="capacity") as caught:
        client(strict_server, key="s3cret").chat.completions.create(model=NAME, messages=ask())
    assert caught.value.response.headers["retry-after"]
    t.join()
    assert first["r"].status_code == 504


@pytest.mark.model
def test_server_sigterm_answers_requests_in_flight_then_exits_0(server):
    """Last of the module's uses of `server`: it stops it."""
    results = {}

    def one(i):
        try:
            results[i] = client(server).chat.completions.create(model=NAME, messages=ask(f"What is {i} + {i}?"))
        except Exception as exc:  # noqa: BLE001 - recorded, asserted below
            results[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    time.sleep(1.0)  # all three are in the pipe
    server.proc.terminate()
    time.sleep(0.3)
    assert server.health()[0] != 200  # draining (503) or the socket is closed already
    for t in threads:
        t.join(120)
    assert all(not isinstance(r, Exception) and r.choices[0].message.content for r in results.values()), results
    assert len(results) == 3
    assert server.proc.wait(60) == 0, server.tail()
