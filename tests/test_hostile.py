"""One request never hurts another: hostile requests against a live server while victim
requests (streams and plain, long generations) are in flight. Each hostile request
must get its 4xx quickly, every victim must finish exactly as it would have alone,
``/health`` must answer within a second throughout, and the KV cache must empty."""
from __future__ import annotations

import json
import random
import socket
import threading
import time

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from test_server import MODEL, ServerProcess  # noqa: E402

VICTIM_TOKENS = 48


@pytest.fixture(scope="module")
def server(tiny_models, tmp_path_factory):
    srv = ServerProcess(tiny_models["llama"], tmp_path_factory.mktemp("hostile"),
                        "--max-request-bytes", str(1 << 20), "--idle-connection-timeout", "1",
                        "--max-stream-buffer", "64", "--stream-stall-timeout", "3",
                        "--max-model-len", "2048").wait_ready()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def trusting_server(tiny_models, tmp_path_factory):
    srv = ServerProcess(tiny_models["llama"], tmp_path_factory.mktemp("trusting"),
                        "--trust-request-chat-template", "--preprocess-timeout", "1").wait_ready()
    yield srv
    srv.stop()


def _victim_bodies() -> list[tuple[str, dict]]:
    base = {"model": MODEL, "max_tokens": VICTIM_TOKENS, "ignore_eos": True, "temperature": 0.0}
    usage = {"stream": True, "stream_options": {"include_usage": True}}
    return [("/completions", {**base, "prompt": "The quick brown fox", **usage}),
            ("/completions", {**base, "prompt": "Paged attention stores"}),
            ("/chat/completions", {**base, "messages": [{"role": "user", "content": "Hi"}], **usage}),
            ("/completions", {**base, "prompt": "def add(a, b):", "temperature": 0.8, "seed": 3,
                              "n": 2})]


def _run_victim(url: str, path: str, body: dict) -> list[tuple[str, str, int]]:
    """(text, finish_reason, completion tokens) per choice."""
    with httpx.Client(base_url=url + "/v1", timeout=120) as http:
        if not body.get("stream"):
            r = http.post(path, json=body)
            assert r.status_code == 200, r.text
            data = r.json()
            per = data["usage"]["completion_tokens"] // len(data["choices"])
            return [(c.get("text", (c.get("message") or {}).get("content")), c["finish_reason"], per)
                    for c in data["choices"]]
        texts: dict[int, list] = {}
        tokens = None
        with http.stream("POST", path, json=body) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if not line.startswith("data:") or line.endswith("[DONE]"):
                    continue
                event = json.loads(line[5:])
                assert "error" not in event, event
                if event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
                for c in event["choices"]:
                    entry = texts.setdefault(c["index"], ["", None])
                    entry[0] += c.get("text") or (c.get("delta") or {}).get("content") or ""
                    entry[1] = c["finish_reason"] or entry[1]
        return [(t, f, tokens // len(texts)) for t, f in (texts[i] for i in sorted(texts))]


@pytest.fixture(scope="module")
def reference(server):
    """What each victim gives with nothing hostile around."""
    return [_run_victim(server.url, path, body) for path, body in _victim_bodies()]


class Victims:
    """Victim requests in threads, and a /health prober that records its worst latency."""

    def __init__(self, srv: ServerProcess) -> None:
        self.srv = srv
        self.results: dict[int, object] = {}
        self.worst_health = 0.0
        self._stop = threading.Event()
        self.threads = [threading.Thread(target=self._victim, args=(i, p, b))
                        for i, (p, b) in enumerate(_victim_bodies())]
        self.threads.append(threading.Thread(target=self._probe))

    def _victim(self, i: int, path: str, body: dict) -> None:
        try:
            self.results[i] = _run_victim(self.srv.url, path, body)
        except BaseException as e:   # noqa: BLE001 - reported by the assertion below
            self.results[i] = e

    def _probe(self) -> None:
        while not self._stop.is_set():
            start = time.monotonic()
            try:
                httpx.get(self.srv.url + "/health", timeout=5).raise_for_status()
            finally:
                self.worst_health = max(self.worst_health, time.monotonic() - start)
            time.sleep(0.05)

    def __enter__(self) -> Victims:
        [t.start() for t in self.threads]
        time.sleep(0.2)   # let the victims start generating
        return self

    def __exit__(self, *exc) -> None:
        [t.join(120) for t in self.threads[:-1]]
        self._stop.set()
        self.threads[-1].join(10)


def _assert_contained(srv: ServerProcess, victims: Victims, reference) -> None:
    for i, ref in enumerate(reference):
        assert victims.results[i] == ref, (i, victims.results[i])
    assert victims.worst_health < 1.0, f"/health took {victims.worst_health:.2f} s"
    deadline = time.monotonic() + 5
    while srv.metric("kv_cache_usage_perc") != 0.0:
        assert time.monotonic() < deadline, "KV blocks still held"
        time.sleep(0.05)


def _post(srv: ServerProcess, path: str, content: bytes, headers: dict | None = None,
          timeout: float = 30) -> tuple[httpx.Response, float]:
    start = time.monotonic()
    r = httpx.post(srv.url + "/v1" + path, content=content, timeout=timeout,
                   headers={"content-type": "application/json", **(headers or {})})
    return r, time.monotonic() - start


TOO_BIG = 1 << 20
HOSTILE = [
    # (name, path, raw body, status, param)
    ("top_k past int64", "/completions",
     '{"model": "tiny", "prompt": "hi", "temperature": 0.7, "top_k": 9223372036854775808}', 400, "top_k"),
    ("stop id outside vocab", "/completions",
     '{"model": "tiny", "prompt": "hi", "min_tokens": 1, "stop_token_ids": [100000]}', 400, "stop_token_ids"),
    ("n = 2^64", "/completions", '{"prompt": "hi", "n": 18446744073709551616}', 400, "n"),
    ("n = 5000", "/completions", '{"prompt": "hi", "n": 5000}', 400, "n"),
    ("best_of = 2^64", "/completions", '{"prompt": "hi", "best_of": 18446744073709551616}', 400, "best_of"),
    ("NaN temperature", "/completions", '{"prompt": "hi", "temperature": NaN}', 400, "temperature"),
    ("Infinity penalty", "/chat/completions",
     '{"messages": [{"role": "user", "content": "hi"}], "frequency_penalty": Infinity}', 400,
     "frequency_penalty"),
    ("seed past int64", "/completions", '{"prompt": "hi", "seed": 18446744073709551616}', 400, "seed"),
    ("stop list too long", "/completions",
     json.dumps({"prompt": "hi", "stop": [f"s{i}" for i in range(5000)]}), 400, "stop"),
    ("lone surrogate prompt", "/completions", '{"prompt": "a\\ud800b"}', 400, "prompt"),
    ("lone surrogate message", "/chat/completions",
     '{"messages": [{"role": "user", "content": "a\\udfffb"}]}', 400, "messages"),
    ("client priority under fcfs", "/completions", '{"prompt": "hi", "priority": -5}', 400, "priority"),
    ("untrusted chat template", "/chat/completions", json.dumps({
        "messages": [{"role": "user", "content": "hi"}],
        "chat_template": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"}),
     400, "chat_template"),
    ("prompt far over the context", "/completions",
     json.dumps({"prompt": "x " * 400_000}), 400, "prompt"),
    ("deeply nested body", "/completions",
     '{"prompt": ' + "[" * 50000 + "]" * 50000 + "}", 400, None),
    ("an integer of 100,000 digits", "/completions", '{"prompt": "hi", "n": ' + "9" * 100000 + "}", 400, None),
    ("too many prompts", "/completions", json.dumps({"prompt": [[5, 6]] * 5000}), 400, "prompt"),
    ("body over the size limit", "/completions",
     json.dumps({"prompt": "x" * (TOO_BIG + 10)}), 413, None),
]


@pytest.mark.parametrize("name,path,body,status,param", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_request_is_contained(server, reference, name, path, body, status, param):
    with Victims(server) as victims:
        r, took = _post(server, path, body.encode())
    assert r.status_code == status, (name, r.text[:500])
    assert took < 2.0, f"{name}: {took:.2f} s"
    assert r.json()["error"]["param"] == param
    _assert_contained(server, victims, reference)


def test_chunked_body_over_the_limit_is_413(server):
    def chunks():
        for _ in range(40):
            yield b" " * 32768     # 1.25 MiB in all, with no Content-Length
    start = time.monotonic()
    r = httpx.post(server.v1 + "/completions", content=chunks(), timeout=30,
                   headers={"content-type": "application/json"})
    assert r.status_code == 413 and time.monotonic() - start < 2


@pytest.mark.parametrize("template", [
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "{{ 'ab ' * 7000000 }}",
    "{{ 'a'.ljust(10000000000) }}",
    "{% set ns = namespace(x='ab') %}{% for i in range(60) %}{% set ns.x = ns.x ~ ns.x %}{% endfor %}",
], ids=["nested-loops", "repeat", "ljust", "doubling"])
def test_trusted_request_template_runs_under_limits(trusting_server, template):
    srv = trusting_server
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                       "chat_template": template, "max_tokens": 2}).encode()
    worst = [0.0]
    done = threading.Event()

    def probe():
        while not done.is_set():
            start = time.monotonic()
            httpx.get(srv.url + "/health", timeout=5)
            worst[0] = max(worst[0], time.monotonic() - start)
            time.sleep(0.05)

    t = threading.Thread(target=probe)
    t.start()
    try:
        r, took = _post(srv, "/chat/completions", body)
    finally:
        done.set()
        t.join()
    assert r.status_code in (400, 408), r.text
    assert took < 3.0 and worst[0] < 1.0, (took, worst[0])
    ok = _post(srv, "/chat/completions", json.dumps({
        "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
        "chat_template": "{% for m in messages %}{{ m.content }}{% endfor %}"}).encode())[0]
    assert ok.status_code == 200


def test_idle_connection_is_closed(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        start = time.monotonic()
        assert s.recv(1) == b""     # the server closed it
        assert time.monotonic() - start < 5


def test_client_that_stops_reading_is_aborted(server, reference):
    """A stream whose client never reads: its unread outputs pile up until the buffer
    bound or the stall timeout aborts it, and its KV blocks come back; the victims in
    flight meanwhile finish as they would have alone."""
    aborted_before = server.metric("request_success_total", 'finished_reason="abort"')
    # 64 choices: every step sends 64 events, so the socket buffers fill within a second.
    body = json.dumps({"model": MODEL, "prompt": "Hello", "max_tokens": 2000, "n": 64,
                       "ignore_eos": True, "stream": True}).encode()
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", server.port))
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    victims = Victims(server).__enter__()
    try:
        deadline = time.monotonic() + 30
        while server.metric("request_success_total", 'finished_reason="abort"') <= aborted_before:
            assert time.monotonic() < deadline, "the stalled stream was not aborted"
            time.sleep(0.1)
    finally:
        victims.__exit__(None, None, None)
        s.close()
    _assert_contained(server, victims, reference)


def test_an_empty_api_key_refuses_to_start(capsys):
    from orbitllm.cli import main
    assert main(["serve", "--api-key", ""]) == 2
    assert "empty" in capsys.readouterr().err


# ---- fuzzing -------------------------------------------------------------------------------

_HOSTILE_VALUES = [None, True, False, -1, 0, 1, 2**31, 2**63, 2**64, -2**63 - 1, 1e308, -1e308,
                   float("nan"), float("inf"), "", "x" * 5000, "\ud800", [], [-1], [2**70], [None],
                   {}, {"a": 1}, [[1, 2], [3]], ["a"] * 200, [0] * 2000, 0.5, "NaN"]
_FIELDS = ["model", "prompt", "messages", "n", "best_of", "max_tokens", "max_completion_tokens",
           "temperature", "top_p", "top_k", "min_p", "seed", "stop", "stop_token_ids", "presence_penalty",
           "frequency_penalty", "repetition_penalty", "logprobs", "top_logprobs", "echo", "logit_bias",
           "min_tokens", "ignore_eos", "priority", "cache_salt", "stream", "stream_options", "suffix",
           "user", "include_stop_str_in_output", "skip_special_tokens", "chat_template",
           "add_generation_prompt", "continue_final_message", "unknown_field",
           "allowed_token_ids", "bad_words", "response_format", "structured_outputs", "guided_json",
           "guided_regex", "guided_choice", "guided_grammar", "tools", "tool_choice", "parallel_tool_calls"]


def test_fuzz_never_500_never_hangs(server):
    rng = random.Random(18)
    greedy = {"model": MODEL, "prompt": "Continuous batching lets", "max_tokens": 8, "temperature": 0.0}
    before = httpx.post(server.v1 + "/completions", json=greedy, timeout=30).json()["choices"][0]["text"]
    bases = {"/completions": {"model": MODEL, "prompt": "hi", "max_tokens": 3},
             "/chat/completions": {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                                   "max_tokens": 3}}
    with httpx.Client(base_url=server.v1, timeout=10) as http:
        for i in range(300):
            path = rng.choice(list(bases))
            body = dict(bases[path])
            for field in rng.sample(_FIELDS, rng.choice([1, 1, 2, 3])):
                body[field] = rng.choice(_HOSTILE_VALUES)
            content = json.dumps(body).encode()
            r = http.post(path, content=content, headers={"content-type": "application/json"})
            assert r.status_code < 500, (content[:300], r.text[:300])
            if r.status_code == 200 and "text/event-stream" in r.headers.get("content-type", ""):
                assert '"server_error"' not in r.text, (content[:300], r.text[-300:])
    after = httpx.post(server.v1 + "/completions", json=greedy, timeout=30).json()["choices"][0]["text"]
    assert after == before
    assert server.metric("kv_cache_usage_perc") == 0.0
