"""The OpenAI-compatible server, end to end: a real ``orbitllm serve`` subprocess on a
free 127.0.0.1 port with a tiny random model, driven by the official ``openai``
client and raw HTTP, checked against the offline API."""
from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")

from orbitllm import LLM, SamplingParams  # noqa: E402

API_KEY = "test-key"
MODEL = "tiny"
MAX_MODEL_LEN = 256
ENGINE_FLAGS = ["--max-model-len", str(MAX_MODEL_LEN), "--num-kv-blocks", "512"]
PROMPTS = ["The quick brown fox", "Paged attention stores", "def add(a, b):", "Bonjour, ça va?",
           "Continuous batching lets", "0123456789 + -"]


# ---- a server in a subprocess ----------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``python -m orbitllm serve`` with its stderr (the access log) in a file."""

    def __init__(self, model: str, log_dir: Path, *flags: str) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_dir / f"server-{self.port}.log"
        self._log = open(self.log_path, "w")
        env = {k: v for k, v in os.environ.items() if k != "ORBITLLM_API_KEY"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "orbitllm", "serve", model, "--port", str(self.port),
             "--served-model-name", MODEL, *ENGINE_FLAGS, *flags],
            stdout=self._log, stderr=subprocess.STDOUT, env=env)

    @property
    def v1(self) -> str:
        return self.url + "/v1"

    def wait_ready(self, timeout: float = 90.0) -> ServerProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"server not ready:\n{self.output()}")

    def output(self) -> str:
        self._log.flush()
        return self.log_path.read_text()

    def access_log(self) -> list[dict]:
        return [json.loads(line) for line in self.output().splitlines() if line.startswith("{")]

    def metric(self, name: str, labels: str = "") -> float:
        text = httpx.get(self.url + "/metrics").text
        match = re.search(rf"^orbitllm:{name}\{{[^}}]*{labels}[^}}]*\}} (\S+)$", text, re.M)
        return float(match.group(1)) if match else 0.0

    def rss_bytes(self) -> int:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) * 1024

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


@pytest.fixture(scope="module")
def model_path(tiny_models) -> str:
    return tiny_models["llama"]


@pytest.fixture(scope="module")
def server(model_path, tmp_path_factory):
    srv = ServerProcess(model_path, tmp_path_factory.mktemp("server"), "--api-key", API_KEY,
                        "--max-num-waiting", "64", "--scheduling-policy", "priority").wait_ready()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def llm(model_path) -> LLM:
    return LLM(model_path, max_model_len=MAX_MODEL_LEN, num_kv_blocks=512)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.v1, api_key=API_KEY, max_retries=0)


def _auth() -> dict:
    return {"Authorization": f"Bearer {API_KEY}"}


def _sse(response) -> list[str]:
    return [line[5:].strip() for line in response.iter_lines() if line.startswith("data:")]


def _offline(llm: LLM, prompt, **params):
    return llm.generate(prompt, SamplingParams(**params), use_tqdm=False)[0]


# ---- plain routes ----------------------------------------------------------------------

def test_models_health_version(server, client):
    assert [m.id for m in client.models.list()] == [MODEL]
    assert client.models.list().data[0].root == MODEL   # a name, never the server's path
    assert httpx.get(server.url + "/health").status_code == 200
    import orbitllm
    assert httpx.get(server.url + "/version").json() == {"version": orbitllm.__version__}


# ---- completions -------------------------------------------------------------------------

def test_completion_matches_offline_with_usage(client, llm):
    prompt = PROMPTS[0]
    resp = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0.8,
                                      seed=11)
    ref = _offline(llm, prompt, max_tokens=8, temperature=0.8, seed=11)
    assert resp.object == "text_completion"
    assert resp.choices[0].text == ref.outputs[0].text
    assert resp.choices[0].finish_reason == ref.outputs[0].finish_reason
    assert resp.usage.prompt_tokens == len(llm.get_tokenizer().encode(prompt))
    assert resp.usage.completion_tokens == len(ref.outputs[0].token_ids)
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens


def test_completion_stream_n2_logprobs_equals_non_stream(server, client):
    args = dict(model=MODEL, prompt=PROMPTS[1], max_tokens=6, temperature=1.0, seed=5, n=2,
                logprobs=2, extra_body={"ignore_eos": True})
    full = client.completions.create(**args)
    texts, tokens, usage = ["", ""], [0, 0], None
    for chunk in client.completions.create(**args, stream=True,
                                           stream_options={"include_usage": True}):
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            texts[c.index] += c.text
            tokens[c.index] += len(c.logprobs.tokens) if c.logprobs else 0
    assert texts == [c.text for c in full.choices]
    assert tokens == [6, 6]
    assert usage.model_dump() == full.usage.model_dump()
    assert usage.completion_tokens == 12
    for c in full.choices:
        lp = c.logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
        assert all(2 <= len(top) <= 3 for top in lp.top_logprobs)   # top 2 plus the chosen one
        assert lp.text_offset == sorted(lp.text_offset)
    with httpx.stream("POST", server.v1 + "/completions", headers=_auth(),
                      json={"model": MODEL, "prompt": PROMPTS[1], "max_tokens": 3,
                            "stream": True}) as r:
        events = _sse(r)
    assert r.headers["content-type"].startswith("text/event-stream")
    assert events[-1] == "[DONE]" and all("usage" not in json.loads(e) for e in events[:-1])


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string(client, llm, stream):
    prompt = PROMPTS[2]
    text = _offline(llm, prompt, max_tokens=16, temperature=0.0, ignore_eos=True).outputs[0].text
    # A 3-character stop string whose first occurrence is well inside the text.
    k = next(k for k in range(3, len(text) - 3)
             if text.find(text[k:k + 3]) == k and "\ufffd" not in text[k:k + 3])
    stop = text[k:k + 3]
    kwargs = dict(model=MODEL, prompt=prompt, max_tokens=16, temperature=0.0, stop=[stop],
                  extra_body={"ignore_eos": True})
    if stream:
        chunks = [c for c in client.completions.create(**kwargs, stream=True) if c.choices]
        got = "".join(c.choices[0].text for c in chunks)
        finish = chunks[-1].choices[0].finish_reason
    else:
        resp = client.completions.create(**kwargs)
        got, finish = resp.choices[0].text, resp.choices[0].finish_reason
        assert resp.choices[0].model_extra["stop_reason"] == stop
    assert got == text[:k]
    assert finish == "stop"


def test_batch_prompts_and_token_ids(client, llm):
    ids = llm.get_tokenizer().encode(PROMPTS[3])
    resp = client.completions.create(model=MODEL, prompt=[PROMPTS[0], PROMPTS[3]], max_tokens=4,
                                      temperature=0.0, n=2)
    assert [c.index for c in resp.choices] == [0, 1, 2, 3]
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=4, temperature=0.0,
                                       echo=True)
    assert by_ids.choices[0].text == PROMPTS[3] + resp.choices[2].text


def test_vllm_extras_match_offline(client, llm):
    extras = dict(top_k=20, min_p=0.01, repetition_penalty=1.2, min_tokens=3)
    resp = client.completions.create(
        model=MODEL, prompt=PROMPTS[5], max_tokens=6, temperature=0.9, seed=7,
        extra_body={**extras, "ignore_eos": True, "priority": -1, "cache_salt": "tenant-a"})
    ref = _offline(llm, PROMPTS[5], max_tokens=6, temperature=0.9, seed=7, ignore_eos=True, **extras)
    assert resp.choices[0].text == ref.outputs[0].text
    assert resp.usage.completion_tokens == 6


# ---- chat --------------------------------------------------------------------------------

def test_chat_matches_offline(client, llm):
    messages = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": "Hello there"}]
    ref = llm.chat(messages, SamplingParams(max_tokens=8, temperature=0.7, seed=3), use_tqdm=False)[0]
    resp = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8,
                                          temperature=0.7, seed=3, logprobs=True, top_logprobs=2)
    choice = resp.choices[0]
    assert resp.object == "chat.completion" and choice.message.role == "assistant"
    assert choice.message.content == ref.outputs[0].text
    assert resp.usage.prompt_tokens == len(llm.apply_chat_template(messages))
    assert resp.usage.completion_tokens == len(ref.outputs[0].token_ids)
    assert len(choice.logprobs.content) == resp.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 for t in choice.logprobs.content)

    stream = client.chat.completions.create(
        model=MODEL, messages=messages, max_completion_tokens=8, temperature=0.7, seed=3,
        stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
        ref.outputs[0].text
    assert chunks[-1].usage.completion_tokens == resp.usage.completion_tokens


def test_fifty_concurrent_streams_match_offline(server, llm):
    prompts = [f"{PROMPTS[i % len(PROMPTS)]} {i}" for i in range(50)]
    params = [SamplingParams(max_tokens=8, temperature=0.8, seed=100 + i) for i in range(50)]
    expected = [o.outputs[0].text for o in llm.generate(prompts, params, use_tqdm=False)]

    async def one(aclient, i: int) -> str:
        stream = await aclient.completions.create(model=MODEL, prompt=prompts[i], max_tokens=8,
                                                  temperature=0.8, seed=100 + i, stream=True)
        return "".join([c.choices[0].text async for c in stream if c.choices])

    async def run() -> list[str]:
        async with openai.AsyncOpenAI(base_url=server.v1, api_key=API_KEY, max_retries=0) as ac:
            return await asyncio.gather(*(one(ac, i) for i in range(50)))

    assert asyncio.run(run()) == expected


# ---- errors ------------------------------------------------------------------------------

LONG_PROMPT = " ".join(["fox"] * (MAX_MODEL_LEN + 10))
ERROR_CASES = [
    # (name, path, body or raw bytes, headers, status, param)
    ("no key", "/completions", {"prompt": "hi"}, {}, 401, None),
    ("wrong key", "/completions", {"prompt": "hi"}, {"Authorization": "Bearer nope"}, 401, None),
    ("malformed json", "/completions", b'{"prompt": "hi",', None, 400, None),
    ("not an object", "/completions", b"[1, 2]", None, 400, None),
    ("wrong type", "/completions", {"prompt": "hi", "max_tokens": "5"}, None, 400, "max_tokens"),
    ("wrong prompt type", "/completions", {"prompt": 5}, None, 400, "prompt"),
    ("unknown model", "/completions", {"model": "gpt-9", "prompt": "hi"}, None, 404, "model"),
    ("prompt too long", "/completions", {"prompt": LONG_PROMPT}, None, 400, "prompt"),
    ("too many tokens", "/completions", {"prompt": "hi", "max_tokens": 1000}, None, 400, "max_tokens"),
    ("temperature", "/completions", {"prompt": "hi", "temperature": -1}, None, 400, "temperature"),
    ("top_p", "/completions", {"prompt": "hi", "top_p": 1.5}, None, 400, "top_p"),
    ("n", "/completions", {"prompt": "hi", "n": 0}, None, 400, "n"),
    ("logprobs", "/completions", {"prompt": "hi", "logprobs": 99}, None, 400, "logprobs"),
    ("token id", "/completions", {"prompt": [10 ** 6]}, None, 400, "prompt_token_ids"),
    ("empty prompt", "/completions", {"prompt": ""}, None, 400, "prompt"),
    ("chat role", "/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, None,
     400, "messages"),
    ("chat no messages", "/chat/completions", {"messages": []}, None, 400, "messages"),
    ("chat top_logprobs", "/chat/completions",
     {"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 50},
     None, 400, "top_logprobs"),
]


def test_errors_then_success(server, llm):
    with httpx.Client(base_url=server.v1, timeout=30) as http:
        for name, path, body, headers, status, param in ERROR_CASES:
            headers = {**(_auth() if headers is None else headers),
                       "content-type": "application/json"}
            content = body if isinstance(body, bytes) else json.dumps(body).encode()
            r = http.post(path, headers=headers, content=content)
            assert r.status_code == status, (name, r.text)
            error = r.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}, name
            assert error["message"] and error["type"], name
            assert error["param"] == param, (name, error)
            if name == "prompt too long":
                n = len(llm.get_tokenizer().encode(LONG_PROMPT))
                assert str(n) in error["message"] and str(MAX_MODEL_LEN) in error["message"]
            ok = http.post("/completions", headers=_auth(),
                           json={"model": MODEL, "prompt": "hi", "max_tokens": 2})
            assert ok.status_code == 200 and len(ok.json()["choices"]) == 1, name
        r = http.get("/nope", headers=_auth())
        assert r.status_code == 404 and "error" in r.json()


# ---- disconnects, metrics, logs --------------------------------------------------------

def _wait_for(predicate, timeout: float) -> float:
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"not true within {timeout}s")
        time.sleep(0.02)
    return time.monotonic() - start


def test_disconnect_aborts_and_frees_kv(server):
    async def open_and_drop(http) -> None:
        async with http.stream("POST", "/completions", headers=_auth(), json={
                "model": MODEL, "prompt": "Paged attention", "max_tokens": 200,
                "ignore_eos": True, "stream": True}) as r:
            async for line in r.aiter_lines():
                if line.startswith("data:"):
                    return

    async def run() -> None:
        async with httpx.AsyncClient(base_url=server.v1, timeout=30) as http:
            await asyncio.gather(*(open_and_drop(http) for _ in range(20)))

    asyncio.run(run())
    _wait_for(lambda: server.metric("kv_cache_usage_perc") == 0.0, timeout=1.0)
    assert server.metric("num_requests_running") == 0
    assert server.metric("request_success_total", 'finished_reason="abort"') >= 20


def test_metrics_exposed(server, client):
    client.completions.create(model=MODEL, prompt=PROMPTS[4], max_tokens=3)
    client.completions.create(model=MODEL, prompt=PROMPTS[4], max_tokens=3)   # a prefix hit
    text = httpx.get(server.url + "/metrics").text
    for name in ["time_to_first_token_seconds", "inter_token_latency_seconds",
                 "e2e_request_latency_seconds", "request_queue_time_seconds"]:
        assert f"orbitllm:{name}_bucket" in text and f"orbitllm:{name}_count" in text
    for name in ["num_requests_running", "num_requests_waiting", "kv_cache_usage_perc",
                 "prompt_tokens_total", "generation_tokens_total", "prefix_cache_queries_total",
                 "prefix_cache_hits_total", "num_preemptions_total", "request_success_total"]:
        assert f"orbitllm:{name}" in text, name
    assert server.metric("request_success_total", 'finished_reason="length"') >= 2
    assert server.metric("generation_tokens_total") >= 6
    assert server.metric("prompt_tokens_total") > 0
    assert server.metric("prefix_cache_queries_total") > 0


def test_access_log_is_json_without_prompts(server, client):
    secret = "zebra quantum marmalade"
    resp = client.completions.create(model=MODEL, prompt=secret, max_tokens=3)
    # The line is written once the response has gone out, so it may trail the client a little.
    _wait_for(lambda: any(r.get("id") == resp.id for r in server.access_log()), timeout=5)
    line = next(r for r in server.access_log() if r.get("id") == resp.id)
    assert line["status"] == 200 and line["path"] == "/v1/completions"
    assert line["prompt_tokens"] == resp.usage.prompt_tokens
    assert line["completion_tokens"] == resp.usage.completion_tokens
    assert line["ttft_s"] is not None and line["ttft_s"] >= 0
    assert secret not in server.output()


# ---- limits ------------------------------------------------------------------------------

def test_load_with_max_num_waiting(server):
    """500 requests at once: each is complete or a 429; none is lost, memory comes back."""
    base = server.rss_bytes()

    async def one(http) -> tuple[int, dict, dict]:
        r = await http.post("/completions", headers=_auth(), json={
            "model": MODEL, "prompt": "Continuous batching", "max_tokens": 4, "ignore_eos": True})
        return r.status_code, r.json(), dict(r.headers)

    async def run() -> list:
        limits = httpx.Limits(max_connections=500, max_keepalive_connections=500)
        async with httpx.AsyncClient(base_url=server.v1, timeout=120, limits=limits) as http:
            return await asyncio.gather(*(one(http) for _ in range(500)))

    start = time.monotonic()
    results = asyncio.run(run())
    assert time.monotonic() - start < 120
    codes = [code for code, _, _ in results]
    assert set(codes) <= {200, 429}, set(codes)
    assert codes.count(200) >= 64
    for code, body, headers in results:
        if code == 200:
            assert body["usage"]["completion_tokens"] == 4
            assert body["choices"][0]["finish_reason"] == "length"
        else:
            assert body["error"]["type"] == "rate_limit_error" and int(headers["retry-after"]) >= 1
    _wait_for(lambda: server.metric("kv_cache_usage_perc") == 0.0, timeout=5)
    assert server.metric("num_requests_waiting") == 0
    assert server.rss_bytes() < base + 100 * 2 ** 20


def test_request_timeout(model_path, tmp_path):
    srv = ServerProcess(model_path, tmp_path, "--request-timeout", "1", "--log-prompts",
                        "--max-model-len", "2048").wait_ready()
    slow = {"model": MODEL, "max_tokens": 2000, "ignore_eos": True}   # takes several seconds

    async def post_slow(http, i: int):
        return await http.post("/completions", json={**slow, "prompt": f"Hello {i}"})

    async def run() -> list:
        async with httpx.AsyncClient(base_url=srv.v1, timeout=30) as http:
            return await asyncio.gather(*(post_slow(http, i) for i in range(4)))

    try:
        results = asyncio.run(run())
        assert {r.status_code for r in results} == {408}
        assert results[0].json()["error"]["code"] == "request_timeout"
        with httpx.stream("POST", srv.v1 + "/completions", timeout=30,
                          json={**slow, "prompt": "Hello", "stream": True}) as r:
            events = _sse(r)
        assert "error" in json.loads(events[-2]) and events[-1] == "[DONE]"
        _wait_for(lambda: srv.metric("kv_cache_usage_perc") == 0.0, timeout=2)
        ok = httpx.post(srv.v1 + "/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2})
        assert ok.status_code == 200
        _wait_for(lambda: any(r.get("status") == 408 for r in srv.access_log()), timeout=5)
        timed_out = [r for r in srv.access_log() if r.get("status") == 408]
        assert {r["prompt"][0] for r in timed_out} == {f"Hello {i}" for i in range(4)}
    finally:
        srv.stop()


def test_sigterm_finishes_in_flight_refuses_new_exits_zero(model_path, tmp_path):
    """Short in-flight streams finish; a long one is cut at the shutdown deadline;
    new requests are refused; the exit code is 0."""
    deadline_s = 1
    srv = ServerProcess(model_path, tmp_path, "--shutdown-timeout", str(deadline_s),
                        "--max-model-len", "2048").wait_ready()
    results: dict[int, list[str]] = {}
    all_started = threading.Barrier(6)

    def stream(i: int, max_tokens: int, n: int = 1) -> None:
        body = {"model": MODEL, "prompt": PROMPTS[i], "max_tokens": max_tokens,
                "ignore_eos": True, "stream": True, "n": n}
        events: list[str] = []
        try:
            with httpx.stream("POST", srv.v1 + "/completions", json=body, timeout=60) as r:
                for line in r.iter_lines():
                    if line.startswith("data:"):
                        if not events:
                            all_started.wait()
                        events.append(line[5:].strip())
        except httpx.HTTPError:
            pass   # the long stream is cut when the deadline passes
        results[i] = events

    threads = [threading.Thread(target=stream, args=(i, 30)) for i in range(3)]
    threads.append(threading.Thread(target=stream, args=(3, 2000, 8)))   # past the deadline
    plain: list[httpx.Response] = []

    def post_plain() -> None:
        post = threading.Thread(target=lambda: plain.append(httpx.post(
            srv.v1 + "/completions", timeout=60, json={"model": MODEL, "prompt": PROMPTS[4],
                                                       "max_tokens": 2000, "n": 8, "ignore_eos": True})))
        post.start()
        time.sleep(0.5)   # admitted before the signal
        all_started.wait()
        post.join(60)

    threads.append(threading.Thread(target=post_plain))
    [t.start() for t in threads]
    all_started.wait(timeout=60)
    srv.proc.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    time.sleep(0.3)
    try:
        refused = httpx.post(srv.v1 + "/completions", timeout=5,
                             json={"model": MODEL, "prompt": "Hi", "max_tokens": 2}).status_code == 503
    except httpx.TransportError:
        refused = True
    assert refused
    assert srv.proc.wait(60) == 0
    assert time.monotonic() - signalled < deadline_s + 10
    [t.join(10) for t in threads]
    for i in range(3):
        assert results[i][-1] == "[DONE]"
        assert json.loads(results[i][-2])["choices"][0]["finish_reason"] == "length"
    # The long one is cut at the deadline, and its client is told so.
    assert results[3][-1] == "[DONE]", (results[3][-3:], srv.output()[-3000:])
    assert json.loads(results[3][-2])["error"]["code"] == "server_shutdown"
    assert plain[0].status_code == 503 and plain[0].json()["error"]["code"] == "server_shutdown"
    srv.stop()


# ---- the engine loop itself --------------------------------------------------------------

def test_engine_loop_survives_bad_requests(llm):
    """An exception for one request fails that request only; a failing step fails the
    requests in flight, and the loop keeps serving."""
    from orbitllm.server.async_engine import AsyncEngine, OutputQueue, RequestStream
    from conftest import assert_all_blocks_free

    engine = llm.engine
    real_add, real_step = engine.add_request, engine.step
    step_failures = [0]

    def add(request_id, prompt, params, **kw):
        if prompt.get("prompt") == "boom":
            raise RuntimeError("tokenizer exploded")
        return real_add(request_id, prompt, params, **kw)

    def step():
        if step_failures[0]:
            step_failures[0] -= 1
            raise RuntimeError("kernel exploded")
        return real_step()

    async def run() -> None:
        ae = AsyncEngine(engine)
        ae.start()
        params = SamplingParams(max_tokens=4, ignore_eos=True, temperature=0.0)
        ids = llm.get_tokenizer().encode("Hello")

        async def generate(rid: str, text: str) -> str:
            sink = OutputQueue(1000, 60.0, lambda: None)
            stream = RequestStream(rid, 0, sink, 1)
            await ae.add(stream, {"prompt": text, "prompt_token_ids": ids}, params)
            text = ""
            while True:
                _, item = await sink.get(None, rid)
                text += "".join(c.text for c in item.choices)
                if item.finished:
                    return text

        results = await asyncio.gather(generate("a", "Hello"), generate("b", "boom"),
                                       generate("c", "Hello"), return_exceptions=True)
        assert isinstance(results[1], RuntimeError)
        assert isinstance(results[0], str) and results[0] == results[2]
        step_failures[0] = 1
        failed = await asyncio.gather(generate("d", "Hello"), return_exceptions=True)
        assert isinstance(failed[0], RuntimeError)
        assert await generate("e", "Hello") == results[0]
        dropped = RequestStream("f", 0, OutputQueue(1000, 60.0, lambda: None), 1)
        await ae.add(dropped, {"prompt_token_ids": ids}, SamplingParams(max_tokens=50))
        ae.abort(dropped)   # before its first output: it must leave the waiting count
        assert ae.num_waiting == 0
        await ae.stop()

    engine.add_request, engine.step = add, step
    try:
        asyncio.run(run())
    finally:
        engine.add_request, engine.step = real_add, real_step
    assert_all_blocks_free(engine)


# ---- the benchmark client ----------------------------------------------------------------

def test_bench_serve(server, tmp_path, capsys):
    from orbitllm.cli import main
    out = tmp_path / "report.json"
    rc = main(["bench", "serve", "--base-url", server.url, "--api-key", API_KEY,
               "--num-prompts", "8", "--request-rate", "50", "--random-input-len", "8",
               "--random-output-len", "4", "--ignore-eos", "--result-json", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["completed"] == 8 and report["failed"] == 0
    assert report["total_output_tokens"] == 32
    assert report["ttft_ms"]["p99"] >= report["ttft_ms"]["p50"] > 0
    text = capsys.readouterr().out
    for label in ["Request throughput", "Output token throughput", "Mean TTFT", "P99 TPOT"]:
        assert label in text

    dataset = tmp_path / "prompts.jsonl"
    dataset.write_text("\n".join(json.dumps({"prompt": p}) for p in
                                 ["Hello there", "fox " * (MAX_MODEL_LEN + 5), "def add(a, b):"]))
    rc = main(["bench", "serve", "--base-url", server.v1, "--api-key", API_KEY, "--endpoint",
               "chat", "--dataset", str(dataset), "--num-prompts", "3", "--max-tokens", "3",
               "--result-json", str(out)])
    report = json.loads(out.read_text())
    assert rc == 0 and report["completed"] == 2 and report["failed"] == 1
    assert any("400" in e for e in report["errors"])


def test_import_orbitllm_stays_light():
    code = ("import sys, orbitllm; from orbitllm.cli import build_parser; build_parser(); "
            "print([m for m in ('fastapi', 'uvicorn', 'pydantic', 'prometheus_client', 'httpx') "
            "if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ---- tensor parallelism ----------------------------------------------------------------

def test_tensor_parallel_server_matches_offline_and_stops_its_workers(model_path, llm, tmp_path):
    """``serve --tensor-parallel-size 2`` (gloo ranks on CPU) answers with one rank's
    greedy text, and SIGTERM takes the worker processes down with the server."""
    psutil = pytest.importorskip("psutil")
    srv = ServerProcess(model_path, tmp_path, "--tensor-parallel-size", "2").wait_ready()
    try:
        children = psutil.Process(srv.proc.pid).children(recursive=True)
        assert children, "no worker process started"
        client = openai.OpenAI(base_url=srv.v1, api_key="unused", max_retries=0)
        for prompt in PROMPTS[:3]:
            got = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
            want = _offline(llm, prompt, max_tokens=12, temperature=0).outputs[0].text
            assert got.choices[0].text == want
    finally:
        srv.stop()

    def running(p) -> bool:
        try:
            return p.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False
    _wait_for(lambda: not any(running(c) for c in children), 10)
