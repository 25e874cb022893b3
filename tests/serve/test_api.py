"""The HTTP API through the official `openai` client (and raw HTTP where the wire format itself is checked), against
one real server process (conftest.py)."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx2 as httpx  # the HTTP client the openai package itself uses (its dependency)
import openai
import pytest

from tests.helpers import run_cli
from tests.serve.conftest import KEY, MAX_BATCH, ROOT

HELD = ROOT / "demo" / "corpus" / "heldout"
PROMPTS = ["def fibonacci(n):", "The king said", "Der Mann", "Москва — ", "import os\n", "Let x = 3"]


def sse(response: httpx.Response) -> list:
    """The data lines of an SSE stream: decoded JSON objects, and the final '[DONE]' as a string."""
    out = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            payload = line[6:]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def complete(server, prompt, **kw) -> str:
    r = server.client().completions.create(model="model", prompt=prompt, **kw)
    return r.choices[0].text


def test_health_was_503_while_loading_then_200(server):
    assert server.first_health == 503
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}


def test_models_lists_the_served_model(server):
    (m,) = server.client().models.list().data
    assert m.id == "model" and m.root.endswith("demo/model") and m.max_model_len == 1024


def test_stream_equals_non_stream_and_has_openai_shape(server):
    c = server.client()
    msgs = [{"role": "user", "content": "What is your name?"}]
    whole = c.chat.completions.create(model="model", messages=msgs, max_tokens=12, temperature=0)
    with httpx.stream("POST", server.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": "model", "messages": msgs, "max_tokens": 12, "temperature": 0, "stream": True,
                            "stream_options": {"include_usage": True}}, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse(r)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    finishes = [ch for ch in chunks if ch["choices"] and ch["choices"][0]["finish_reason"]]
    assert len(finishes) == 1 and finishes[0]["choices"][0]["delta"] == {}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole.usage.model_dump(exclude_none=True)
    assert all(ch["usage"] is None for ch in chunks[:-1])
    text = "".join(ch["choices"][0]["delta"].get("content") or "" for ch in chunks if ch["choices"])
    assert text == whole.choices[0].message.content and text
    assert finishes[0]["choices"][0]["finish_reason"] == whole.choices[0].finish_reason
    # completions, through the client's own stream parser; without include_usage there is no usage chunk
    parts = list(c.completions.create(model="model", prompt=PROMPTS[0], max_tokens=10, temperature=0, stream=True))
    assert all(p.usage is None for p in parts) and sum(1 for p in parts if p.choices[0].finish_reason) == 1
    assert "".join(p.choices[0].text for p in parts) == complete(server, PROMPTS[0], max_tokens=10, temperature=0)


def test_parallel_requests_equal_each_alone_and_moekit_run(server, capsys, monkeypatch, tmp_path):
    alone = [complete(server, p, max_tokens=10, temperature=0) for p in PROMPTS]
    with ThreadPoolExecutor(len(PROMPTS)) as pool:  # more than --max-batch: some wait, all share steps
        together = list(pool.map(lambda p: complete(server, p, max_tokens=10, temperature=0), PROMPTS))
    assert together == alone
    monkeypatch.setenv("MOEKIT_CACHE", str(tmp_path))
    for prompt, text in list(zip(PROMPTS, alone))[:1]:
        code, out, err = run_cli(["run", str(ROOT / "demo" / "model"), "--budget", "6MiB", "--store",
                                  str(server.store), "--prompt", prompt, "--max-new-tokens", "10", "--json"], capsys)
        assert code == 0, err
        assert json.loads(out)["text"] == prompt + text


def test_each_request_routes_by_its_own_policy(server, capsys, monkeypatch, tmp_path):
    """A request's `routing` field applies to its rows only: next to stock requests in the same steps, a topk=1 request
    gives what `moekit run --routing topk=1` gives, the stock ones what they give alone; "stock" is the stock routing."""
    def routed(prompt, spec):
        return complete(server, prompt, max_tokens=10, temperature=0, extra_body={"routing": spec})

    stock = [complete(server, p, max_tokens=10, temperature=0) for p in PROMPTS[:3]]
    with ThreadPoolExecutor(4) as pool:
        one = pool.submit(routed, PROMPTS[0], "topk=1")
        together = list(pool.map(lambda p: complete(server, p, max_tokens=10, temperature=0), PROMPTS[:3]))
        one = one.result()
    assert together == stock and one != stock[0]
    assert routed(PROMPTS[1], "stock") == stock[1]
    monkeypatch.setenv("MOEKIT_CACHE", str(tmp_path))
    code, out, err = run_cli(["run", str(ROOT / "demo" / "model"), "--budget", "6MiB", "--store", str(server.store),
                              "--prompt", PROMPTS[0], "--max-new-tokens", "10", "--routing", "topk=1", "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["text"] == PROMPTS[0] + one


def test_the_same_seed_gives_the_same_text(server):
    kw = dict(max_tokens=8, temperature=1.0, top_p=0.9, extra_body={"top_k": 50})
    a = complete(server, PROMPTS[1], seed=7, **kw)
    with ThreadPoolExecutor(3) as pool:  # the same seed again, while other requests share the batch
        others = [pool.submit(complete, server, p, seed=i, **kw) for i, p in enumerate(PROMPTS[2:4])]
        b = complete(server, PROMPTS[1], seed=7, **kw)
        [f.result() for f in others]
    assert a == b
    assert {complete(server, PROMPTS[1], seed=s, **kw) for s in (1, 2, 3)} != {a}
    r = server.client().completions.create(model="model", prompt=PROMPTS[1], n=3, seed=7, **kw)
    assert r.choices[0].text == a and len({c.text for c in r.choices}) > 1  # choice i draws from seed + i
    assert [c.index for c in r.choices] == [0, 1, 2] and r.usage.completion_tokens > 8


def test_stop_strings_are_held_back_and_cut(server):
    base = complete(server, PROMPTS[0], max_tokens=24, temperature=0)
    stop = base[12:15]
    assert stop and base.find(stop) == 12
    r = server.client().completions.create(model="model", prompt=PROMPTS[0], max_tokens=24, temperature=0,
                                           stop=[stop, "never-there"])
    assert r.choices[0].text == base[:12] and r.choices[0].finish_reason == "stop"
    with httpx.stream("POST", server.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"prompt": PROMPTS[0], "max_tokens": 24, "temperature": 0, "stream": True,
                            "stop": stop}, timeout=60) as resp:
        pieces = [e["choices"][0]["text"] for e in sse(resp)[:-1]]
    assert "".join(pieces) == base[:12]
    assert not any(stop[:2] in p for p in pieces)  # no part of the stop string went out


def test_cjk_and_cyrillic_stream_without_replacement_chars(server):
    for domain in ("japanese", "russian"):
        prompt = (HELD / f"{domain}.txt").read_text()[:150]
        with httpx.stream("POST", server.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                          json={"prompt": prompt, "max_tokens": 16, "temperature": 0, "stream": True},
                          timeout=60) as r:
            pieces = [e["choices"][0]["text"] for e in sse(r)[:-1]]
        text = complete(server, prompt, max_tokens=16, temperature=0)
        assert "".join(pieces) == text and len(text) > 5
        if "\ufffd" not in text:
            assert not any("\ufffd" in p for p in pieces)


def test_logprobs(server):
    c = server.client()
    r = c.completions.create(model="model", prompt=PROMPTS[0], max_tokens=4, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert all(len(t) == 3 for t in lp.top_logprobs) and "".join(lp.tokens) == r.choices[0].text
    assert all(v == pytest.approx(max(t.values())) for v, t in zip(lp.token_logprobs, lp.top_logprobs))  # greedy
    r = c.chat.completions.create(model="model", messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                  temperature=0, logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert content and all(len(e.top_logprobs) == 2 and e.logprob <= 0 for e in content)
    assert b"".join(bytes(e.bytes) for e in content).decode() == r.choices[0].message.content


def test_chat_on_the_demo_model(server):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "How are you?"}]
    r = server.client().chat.completions.create(model="model", messages=msgs, max_tokens=16, temperature=0)
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content.strip()
    assert r.object == "chat.completion" and r.choices[0].finish_reason in ("stop", "length")
    tok = server.post("/tokenize", {"messages": msgs}).json()
    assert r.usage.prompt_tokens == tok["count"]
    assert server.post("/detokenize", {"tokens": tok["tokens"]}).json()["prompt"] == "Be brief.\nA: How are you?\nB:"


ERRORS = [  # (route, body, status, words in the message)
    ("/v1/completions", {"prompt": "x", "max_tokens": 2, "frequency_penalty": 0.5}, 400, "frequency_penalty"),
    ("/v1/completions", {"prompt": "x", "foo": 1}, 400, "unknown field 'foo'"),
    ("/v1/completions", {"prompt": "x", "temperature": 3}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ("/v1/completions", {"prompt": "x", "logprobs": 21}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 5000}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "n": 0}, 400, "n"),
    ("/v1/completions", {"prompt": [99999]}, 400, "token ids"),
    ("/v1/completions", {"max_tokens": 2}, 400, "prompt is required"),
    ("/v1/completions", {"prompt": "x", "model": "other"}, 404, "does not exist"),
    ("/v1/completions", {"prompt": "x", "model": "/etc/passwd"}, 404, "does not exist"),
    ("/v1/completions", {"prompt": "word " * 1100}, 413, "over the limit"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "tool", "content": "x"}]}, 400, "role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]},
     400, "tools"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, 400, "logprobs"),
    ("/tokenize", {"prompt": "x", "messages": [{"role": "user", "content": "x"}]}, 400, "exactly one"),
    # per-request routing: never a file the request names, no calibration, checked against the model
    ("/v1/completions", {"prompt": "x", "routing": "replay=/etc/passwd"}, 400, "a request may not name"),
    ("/v1/completions", {"prompt": "x", "routing": "topk=2+c3po=/tmp/ref.npz"}, 400, "a request may not name"),
    ("/v1/completions", {"prompt": "x", "routing": "skip=auto"}, 400, "skip=auto calibrates"),
    ("/v1/completions", {"prompt": "x", "routing": "hottest=1"}, 400, "'hottest'"),
    ("/v1/completions", {"prompt": "x", "routing": "mask=99:0"}, 400, "99"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "routing": ""}, 400, "routing"),
]


@pytest.mark.parametrize("route, body, status, words", ERRORS)
def test_error_paths(server, route, body, status, words):
    r = server.post(route, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and words in err["message"]


def test_errors_outside_the_body(server):
    assert server.post("/v1/completions", {"prompt": "x"}, auth=False).status_code == 401
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "x"}, headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert server.post("/v1/completions", content=b"{not json", auth=True).status_code == 400
    big = server.post("/v1/completions", {"prompt": "x" * 70000})  # over --max-body-bytes 65536
    assert big.status_code == 413 and big.json()["error"]["code"] == "body_too_large"
    assert server.get("/v1/nothing").status_code == 404 and "error" in server.get("/v1/nothing").json()
    with pytest.raises(openai.BadRequestError):  # vLLM's check: the server keeps working after it
        server.client().chat.completions.create(model="model", messages=[{"role": "user", "content": "x"}],
                                                logprobs=True, top_logprobs=21)
    assert complete(server, "x", max_tokens=2, temperature=0)


def test_disconnect_aborts_only_that_request(server):
    """Running streams closed mid-way, queued ones closed before they started and a non-streamed request whose client
    gave up are all aborted (the metrics say so), while a request running next to them completes."""
    before = server.metrics().get("vllm:request_success_total{finished_reason=abort}", 0)
    body = {"prompt": PROMPTS[2], "max_tokens": 400, "temperature": 0, "stream": True}
    survivor = {}
    t = threading.Thread(target=lambda: survivor.update(text=complete(server, PROMPTS[3], max_tokens=40,
                                                                      temperature=0)))
    t.start()
    clients = [httpx.Client(headers={"Authorization": f"Bearer {KEY}"}, timeout=60) for _ in range(MAX_BATCH + 1)]
    opened = [cl.stream("POST", server.url + "/v1/completions", json=body) for cl in clients]
    streams = [cm.__enter__() for cm in opened]  # the batch is full: the last one waits in the queue
    next(streams[0].iter_lines())  # the first one is running and streaming
    with pytest.raises(httpx.ReadTimeout):  # a non-streamed request whose client gives up waiting (queued too)
        httpx.post(server.url + "/v1/completions", json={**body, "stream": False},
                   headers={"Authorization": f"Bearer {KEY}"}, timeout=httpx.Timeout(60, read=1.0))
    for cm, cl in zip(opened, clients):
        cm.__exit__(None, None, None)
        cl.close()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        m = server.metrics()
        if m.get("vllm:request_success_total{finished_reason=abort}", 0) - before >= MAX_BATCH + 2:
            break
        time.sleep(0.2)
    assert m["vllm:request_success_total{finished_reason=abort}"] - before == MAX_BATCH + 2
    t.join(timeout=60)
    assert survivor["text"] == complete(server, PROMPTS[3], max_tokens=40, temperature=0)
    assert server.metrics()["vllm:num_requests_running"] == 0


def test_metrics_parse_and_count(server):
    complete(server, PROMPTS[0], max_tokens=4, temperature=0)
    m = server.metrics()
    for name in ("vllm:time_to_first_token_seconds_count", "vllm:inter_token_latency_seconds_count",
                 "vllm:e2e_request_latency_seconds_count", "vllm:request_queue_time_seconds_count",
                 "vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:num_requests_running",
                 "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"):
        assert name in m, name
    assert m["vllm:generation_tokens_total"] >= 4 and m["vllm:request_success_total{finished_reason=length}"] >= 1
    layers = {k.split("layer=")[1].rstrip("}") for k in m if k.startswith("moekit:expert_cache_hits_total")}
    assert layers == {"0", "1", "2", "3"}
    assert all(m[f"moekit:expert_cache_misses_total{{layer={i}}}"] > 0 for i in layers)  # 8 of 32 cached
    assert m["moekit:expert_bytes_read_total{layer=0}"] > 0 and m["moekit:expert_cache_capacity"] == 8
    steps = m["moekit:experts_per_step_count{layer=0}"]
    assert steps > 0 and 4 <= m["moekit:experts_per_step_sum{layer=0}"] / steps <= 32  # top-4 of 32 per token
    assert not any("expert=" in k for k in m)  # never labelled by expert
