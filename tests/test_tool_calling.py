"""Tool calling through the official openai client: tool_choice "required" and a named
function (grammar-enforced, so arguments always parse), "auto" read by the Hermes parser,
streamed deltas as OpenAI sends them, a conversation that continues after tool results,
and 400s for bad tool requests. The parsers alone are checked on fixed texts."""
from __future__ import annotations

import json
import time

import pytest

from orbitllm.server.tool_parsers import HermesToolParser, Llama3JsonToolParser, parser_for

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("xgrammar")

WEATHER = {"type": "object", "properties": {
    "city": {"enum": ["Paris", "Tokyo", "Lima"]},
    "unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["city", "unit"]}
ADD = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                        "b": {"type": "integer", "minimum": 0, "maximum": 99}},
       "required": ["a", "b"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "add", "description": "Add two numbers",
                                           "parameters": ADD}}]
SCHEMA_OF = {"get_weather": WEATHER, "add": ADD}
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def client(tools_server):
    return openai.OpenAI(base_url=tools_server.v1, api_key="test-key", max_retries=0)


def _check_calls(calls, names=None) -> None:
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name in (names or SCHEMA_OF)
        jsonschema.validate(json.loads(call.function.arguments), SCHEMA_OF[call.function.name])


def _streamed(chunks):
    """The client's view of a stream: content, calls by index (id, name, arguments) and
    the finish reason; checks each call opens with its id, type and name."""
    content, calls, reason = "", {}, None
    for chunk in chunks:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        for d in choice.delta.tool_calls or []:
            if d.index not in calls:
                assert d.id and d.type == "function" and d.function.name, d
                calls[d.index] = {"id": d.id, "name": d.function.name, "arguments": d.function.arguments or ""}
            else:
                assert d.id is None and not (d.function and d.function.name)
                calls[d.index]["arguments"] += d.function.arguments or ""
        reason = choice.finish_reason or reason
    return content, [calls[i] for i in sorted(calls)], reason


@pytest.mark.parametrize("stream", [False, True])
def test_named_function(client, stream):
    choice = {"type": "function", "function": {"name": "add"}}
    kwargs = dict(model="tiny", messages=MESSAGES, tools=TOOLS, tool_choice=choice, max_tokens=60,
                  temperature=1.0, seed=7)
    if not stream:
        r = client.chat.completions.create(**kwargs)
        _check_calls(r.choices[0].message.tool_calls, ["add"])
        assert r.choices[0].finish_reason == "tool_calls"
        return
    content, calls, reason = _streamed(client.chat.completions.create(**kwargs, stream=True))
    assert not content and reason == "tool_calls" and len(calls) == 1 and calls[0]["name"] == "add"
    jsonschema.validate(json.loads(calls[0]["arguments"]), ADD)


@pytest.mark.parametrize("stream", [False, True])
def test_required_parallel_calls(client, stream):
    for seed in range(3):
        kwargs = dict(model="tiny", messages=MESSAGES, tools=TOOLS, tool_choice="required", max_tokens=150,
                      temperature=1.0, seed=seed)
        if not stream:
            r = client.chat.completions.create(**kwargs)
            _check_calls(r.choices[0].message.tool_calls)
            assert r.choices[0].finish_reason == "tool_calls"
            continue
        _, calls, reason = _streamed(client.chat.completions.create(**kwargs, stream=True))
        assert reason == "tool_calls" and calls
        for c in calls:
            jsonschema.validate(json.loads(c["arguments"]), SCHEMA_OF[c["name"]])
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, tools=TOOLS, tool_choice="required",
                                       parallel_tool_calls=False, max_tokens=150, seed=1)
    assert len(r.choices[0].message.tool_calls) == 1


HERMES_TEXT = ('Let me check. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Tokyo", '
               '"unit": "celsius"}}\n</tool_call>\n<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}'
               '\n</tool_call>')


@pytest.mark.parametrize("stream", [False, True])
def test_auto_reads_hermes_calls(client, stream):
    """The model's text (forced here by a one-choice grammar, as a trained model would
    write it) is parsed into two calls and the content before them."""
    kwargs = dict(model="tiny", messages=MESSAGES, tools=TOOLS, max_tokens=400,
                  extra_body={"guided_choice": [HERMES_TEXT]})
    if not stream:
        r = client.chat.completions.create(**kwargs)
        m = r.choices[0].message
        assert m.content == "Let me check."
        assert [(c.function.name, json.loads(c.function.arguments)) for c in m.tool_calls] == [
            ("get_weather", {"city": "Tokyo", "unit": "celsius"}), ("add", {"a": 2, "b": 3})]
        assert r.choices[0].finish_reason == "tool_calls"
        return
    content, calls, reason = _streamed(client.chat.completions.create(**kwargs, stream=True))
    assert content.strip() == "Let me check." and reason == "tool_calls"
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [
        ("get_weather", {"city": "Tokyo", "unit": "celsius"}), ("add", {"a": 2, "b": 3})]


def test_auto_plain_text_and_none(client):
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, tools=TOOLS, max_tokens=40,
                                       temperature=0, extra_body={"guided_choice": ["It is sunny."]})
    assert r.choices[0].message.content == "It is sunny." and not r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "stop"
    with_tools = client.chat.completions.create(model="tiny", messages=MESSAGES, tools=TOOLS, max_tokens=1)
    none = client.chat.completions.create(model="tiny", messages=MESSAGES, tools=TOOLS, tool_choice="none",
                                          max_tokens=1)
    plain = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=1)
    assert with_tools.usage.prompt_tokens > plain.usage.prompt_tokens == none.usage.prompt_tokens


def test_conversation_with_tool_results_continues(client, tools_server):
    first = client.chat.completions.create(model="tiny", messages=MESSAGES, tools=TOOLS,
                                           tool_choice="required", max_tokens=150, seed=2)
    calls = first.choices[0].message.tool_calls
    messages = MESSAGES + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": c.function.arguments}}
        for c in calls]}]
    messages += [{"role": "tool", "tool_call_id": c.id, "content": json.dumps({"result": 21})} for c in calls]
    r = client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS, max_tokens=6, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length") and isinstance(r.choices[0].message.content, str)
    assert r.usage.prompt_tokens > first.usage.prompt_tokens   # the calls and results were rendered
    deadline = time.monotonic() + 5
    while tools_server.metric("kv_cache_usage_perc") != 0.0:   # every KV block back in the pool
        assert time.monotonic() < deadline, "KV blocks still held"
        time.sleep(0.05)


BAD = [
    ("unknown tool in tool_choice", {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice"),
    ("tool_choice without tools", {"tool_choice": "required"}, "tool_choice"),
    ("bad tool_choice string", {"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ("duplicate tool names", {"tools": TOOLS + TOOLS[:1]}, "tools"),
    ("invalid parameters schema", {"tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "foo"}}}], "tool_choice": "required"}, "tools"),
    ("forced call and response_format", {"tools": TOOLS, "tool_choice": "required",
                                         "response_format": {"type": "json_object"}}, "tool_choice"),
    ("arguments not JSON", {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "add", "arguments": "{oops"}}]}]}, "messages"),
]


@pytest.mark.parametrize("name,extra,param", BAD, ids=[b[0] for b in BAD])
def test_bad_tool_requests_are_400(tools_server, name, extra, param):
    body = {"model": "tiny", "max_tokens": 4, "messages": MESSAGES, **extra}
    with httpx.Client(base_url=tools_server.v1, timeout=30,
                      headers={"Authorization": "Bearer test-key"}) as http:
        r = http.post("/chat/completions", json=body)
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == param and error["type"] == "invalid_request_error", error
        ok = http.post("/chat/completions", json={"model": "tiny", "messages": MESSAGES, "max_tokens": 2})
        assert ok.status_code == 200


def test_parsers_on_fixed_texts():
    hermes = HermesToolParser()
    content, calls = hermes.parse(HERMES_TEXT)
    assert content == "Let me check." and [c.name for c in calls] == ["get_weather", "add"]
    assert hermes.parse("no calls <tool_call>{broken") == ("no calls <tool_call>{broken", [])
    llama = Llama3JsonToolParser()
    content, calls = llama.parse('<|python_tag|>{"name": "add", "parameters": {"a": 1, "b": 2}}; '
                                 '{"name": "get_weather", "parameters": {"city": "Lima", "unit": "celsius"}}')
    assert content is None and [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("add", {"a": 1, "b": 2}), ("get_weather", {"city": "Lima", "unit": "celsius"})]
    assert llama.parse("Sure, {not json") == ("Sure, {not json", [])
    assert isinstance(parser_for(None, "...<tool_call>..."), HermesToolParser)
    assert isinstance(parser_for("llama3_json", None), Llama3JsonToolParser)
    assert parser_for(None, "{{ messages }}") is None
    with pytest.raises(ValueError, match="tool-call-parser"):
        parser_for("mistral", None)
