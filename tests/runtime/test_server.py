"""The OpenAI-compatible server (issue 17 item 8), driven by the official `openai` client
against 127.0.0.1."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import httpx2 as httpx  # the HTTP client the openai package is built on
import pytest

import pallax

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

NAME = "smollm2-test"
PROMPT = "The capital of France is"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _serving(engine):
    from pallax.runtime.server import make_app

    port = _free_port()
    config = uvicorn.Config(make_app(engine, NAME), host="127.0.0.1", port=port,
                            log_level="warning")  # fmt: skip
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not server.started:
        assert time.time() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def served(compiled_fp32):
    engine = pallax.Engine(compiled_fp32, max_batch=2, max_len=256, max_waiting=1)
    with engine, _serving(engine) as url:
        yield engine, url, openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)


def test_completions_equal_generate_streamed_or_not(served, compiled_fp32):
    _, _, client = served
    want = compiled_fp32.generate([PROMPT], max_new_tokens=12)[0]
    res = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=12, temperature=0)
    assert res.choices[0].text == want.text
    assert res.choices[0].finish_reason == want.finish_reason
    assert res.usage.completion_tokens == len(want.token_ids)
    assert res.usage.prompt_tokens == len(want.prompt_token_ids)
    chunks = list(client.completions.create(model=NAME, prompt=PROMPT, max_tokens=12,
                                            temperature=0, stream=True))  # fmt: skip
    assert "".join(c.choices[0].text for c in chunks) == want.text
    assert chunks[-1].choices[0].finish_reason == "length"
    ids = client.completions.create(model=NAME, prompt=want.prompt_token_ids, max_tokens=12,
                                    temperature=0)  # fmt: skip
    assert ids.choices[0].text == want.text


def test_chat_completions_use_the_chat_template(served, compiled_fp32):
    _, _, client = served
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = compiled_fp32.tokenizer.apply_chat_template(messages, tokenize=True)
    want = compiled_fp32.generate([ids], max_new_tokens=10)[0]
    res = client.chat.completions.create(model=NAME, messages=messages, max_tokens=10,
                                         temperature=0)  # fmt: skip
    assert res.choices[0].message.role == "assistant"
    assert res.choices[0].message.content == want.text
    stream = client.chat.completions.create(model=NAME, messages=messages, max_tokens=10,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True})  # fmt: skip
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
    assert chunks[-1].usage.completion_tokens == len(want.token_ids)


def test_models_health_and_metrics(served):
    engine, url, client = served
    assert [m.id for m in client.models.list().data] == [NAME]
    assert httpx.get(url + "/health").json() == {"status": "ok"}
    text = httpx.get(url + "/metrics").text
    assert "pallax_generated_tokens_total" in text and "pallax_running 0" in text


def test_invalid_requests_get_400_naming_the_field(served):
    _, url, client = served
    for kw, field in [
        (dict(temperature=-1), "temperature"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(n=2), "n"),
        (dict(top_p="high"), "top_p"),
        (dict(max_tokens=300), "max_len=256"),
        (dict(max_tokens=10**6), "context length"),
    ]:
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model=NAME, prompt=PROMPT, **kw)
        assert field in str(e.value)
    with pytest.raises(openai.BadRequestError, match="prompt"):
        client.completions.create(model=NAME, prompt=[PROMPT, PROMPT])
    with pytest.raises(openai.NotFoundError, match="other-model"):
        client.completions.create(model="other-model", prompt=PROMPT)
    r = httpx.post(url + "/v1/completions", content=b"{not json")
    assert r.status_code == 400 and "not JSON" in r.json()["error"]["message"]
    r = httpx.post(url + "/v1/chat/completions", json={"model": NAME, "messages": []})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"


def test_a_client_that_leaves_frees_its_slot_and_overload_gets_429(served):
    engine, url, _ = served
    body = {"model": NAME, "prompt": PROMPT, "max_tokens": 200, "ignore_eos": True,
            "temperature": 0, "stream": True}  # fmt: skip
    before = engine.stats().get("cancelled", 0)
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        next(r.iter_lines())  # the first event, then the client goes away
    deadline = time.time() + 60
    while engine.stats().get("cancelled", 0) == before or engine.stats()["running"]:
        assert time.time() < deadline, engine.stats()
        time.sleep(0.05)
    # 2 slots and 1 waiting place: the fourth concurrent request is refused with 429
    body = dict(body, stream=False)
    with httpx.Client(timeout=120) as http:
        results = []

        def post():
            results.append(http.post(url + "/v1/completions", json=body).status_code)

        threads = [threading.Thread(target=post) for _ in range(3)]
        for t in threads:
            t.start()
        while engine.stats()["running"] + engine.stats()["waiting"] < 3:
            time.sleep(0.02)
        r = http.post(url + "/v1/completions", json=body)
        assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
        for t in threads:
            t.join()
    assert results == [200, 200, 200]
