"""Tool calling: what ``tool_choice`` forces, and reading tool calls out of the model's text.

``tool_choice`` "required" and a named function are enforced with the grammar engine,
so the arguments always parse: a named function's output is its arguments (a JSON
object under the function's parameter schema), "required" makes a JSON array of
``{"name", "parameters"}`` objects, one schema per tool. "auto" lets the model choose
and a parser per model format reads its calls: Hermes / Qwen ``<tool_call>{json}</tool_call>``
blocks (``hermes``) or Llama 3 JSON ``{"name": ..., "parameters": ...}`` (``llama3_json``),
chosen by ``--tool-call-parser`` or from the chat template.

Streaming follows OpenAI: each call's first delta carries its index, id, type and
function name (arguments ""), the next ones argument text.
"""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

from orbitllm.sampling_params import StructuredOutputsParams

PARSERS = ("hermes", "llama3_json")


@dataclass
class ParsedCall:
    name: str
    arguments: str   # JSON text


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


# ---- what tool_choice asks for ------------------------------------------------------

def tool_mode(body) -> str:
    """"none", "auto", "required" or "named" (no tools: "none")."""
    if not body.tools:
        return "none"
    choice = body.tool_choice
    if choice is None:
        return "auto"
    return choice if isinstance(choice, str) else "named"


def tool_choice_constraint(body) -> StructuredOutputsParams | None:
    """The schema "required" or a named function forces; ValueError naming the field
    for a choice the tools do not allow. Needs ``tools`` (chat requests only)."""
    tools = getattr(body, "tools", None)
    choice = getattr(body, "tool_choice", None)
    if choice not in (None, "none") and not tools:
        raise ValueError("tool_choice: is only allowed when tools are given")
    if not tools:
        return None
    names = [t.function.name for t in tools]
    if len(set(names)) != len(names):
        raise ValueError(f"tools: function names must be unique, got {names}")
    mode = tool_mode(body)
    if mode == "named":
        wanted = choice.function.name
        tool = next((t for t in tools if t.function.name == wanted), None)
        if tool is None:
            raise ValueError(f"tool_choice: function {wanted!r} is not among the tools {names}")
        return StructuredOutputsParams(json=_parameters(tool))
    if mode == "required":
        items = [{"type": "object", "properties": {"name": {"type": "string", "enum": [t.function.name]},
                                                   "parameters": _parameters(t)},
                  "required": ["name", "parameters"]} for t in tools]
        schema = {"type": "array", "minItems": 1,
                  "items": items[0] if len(items) == 1 else {"anyOf": items}}
        if not body.parallel_tool_calls:
            schema["maxItems"] = 1
        return StructuredOutputsParams(json=schema)
    return None


def _parameters(tool) -> dict:
    return tool.function.parameters or {"type": "object", "properties": {}}


def template_tools(body) -> list[dict] | None:
    """The tools as the chat template reads them (OpenAI's shape); none for "none"."""
    if tool_mode(body) == "none":
        return None
    return [t.model_dump(exclude_none=True) for t in body.tools]


# ---- parsers, one per model format -----------------------------------------------------

class ToolParser:
    """Reads complete tool calls from text; ``call_start`` finds where a call begins so
    a stream can send the text before it as content."""

    name = ""
    start = ""   # the marker that opens a call

    def parse(self, text: str) -> tuple[str | None, list[ParsedCall]]:
        """(the content outside calls or None, the calls); text that does not parse
        as calls stays content."""
        raise NotImplementedError

    def call_start(self, text: str) -> int | None:
        """Where a call begins in ``text`` (None: nowhere yet)."""
        raise NotImplementedError


class HermesToolParser(ToolParser):
    """Hermes / Qwen 2.5 / Qwen 3: ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``."""

    name = "hermes"
    start, end = "<tool_call>", "</tool_call>"

    def parse(self, text: str) -> tuple[str | None, list[ParsedCall]]:
        calls, content, pos = [], [], 0
        while (i := text.find(self.start, pos)) >= 0:
            j = text.find(self.end, i)
            body = text[i + len(self.start):j if j >= 0 else len(text)]
            call = _call_from_json(body, "arguments")
            if call is None:
                break
            content.append(text[pos:i])
            calls.append(call)
            pos = len(text) if j < 0 else j + len(self.end)
        content.append(text[pos:])
        rest = "".join(content).strip()
        return (rest or None) if calls else text, calls

    def call_start(self, text: str) -> int | None:
        i = text.find(self.start)
        return i if i >= 0 else None


class Llama3JsonToolParser(ToolParser):
    """Llama 3.x JSON tool calls: ``{"name": ..., "parameters": {...}}``, several joined
    by ``;``, optionally after ``<|python_tag|>``; the whole message is the calls."""

    name = "llama3_json"
    start = "{"

    def parse(self, text: str) -> tuple[str | None, list[ParsedCall]]:
        body = text.strip().removeprefix("<|python_tag|>").strip()
        if not body.startswith("{"):
            return text, []
        decoder, calls, pos = json.JSONDecoder(), [], 0
        while pos < len(body):
            try:
                obj, pos = decoder.raw_decode(body, pos)
            except ValueError:
                return text, []
            call = _call_from_obj(obj, "parameters")
            if call is None:
                return text, []
            calls.append(call)
            while pos < len(body) and body[pos] in " \n\t;":
                pos += 1
        return None, calls

    def call_start(self, text: str) -> int | None:
        stripped = text.lstrip().removeprefix("<|python_tag|>").lstrip()
        if not stripped:
            return None
        return 0 if stripped.startswith("{") else None


def _call_from_json(text: str, args_key: str) -> ParsedCall | None:
    try:
        return _call_from_obj(json.loads(text), args_key)
    except ValueError:
        return None


def _call_from_obj(obj, args_key: str) -> ParsedCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get(args_key, obj.get("arguments", obj.get("parameters", {})))
    return ParsedCall(obj["name"], args if isinstance(args, str) else json.dumps(args, ensure_ascii=False))


_BY_NAME = {p.name: p for p in (HermesToolParser, Llama3JsonToolParser)}


def parser_for(name: str | None, chat_template: str | None) -> ToolParser | None:
    """``--tool-call-parser``'s parser, else the one the chat template's format shows."""
    if name is not None:
        if name not in _BY_NAME:
            raise ValueError(f"--tool-call-parser: {name!r} is not one of {', '.join(PARSERS)}")
        return _BY_NAME[name]()
    template = chat_template or ""
    if "<tool_call>" in template:
        return HermesToolParser()
    if "<|python_tag|>" in template or ('"parameters"' in template and "ipython" in template):
        return Llama3JsonToolParser()
    return None


# ---- one response's tool calls ------------------------------------------------------------

@dataclass
class ChoiceToolStream:
    """One streamed choice: text is held back from the point a call may start, and each
    call goes out whole once it parses (named calls stream their arguments as they come)."""

    held: str = ""
    sent_calls: int = 0
    in_call: bool = False
    named_id: str | None = None


class ToolCalling:
    """How one chat request's output turns into tool calls (None: it has none)."""

    def __init__(self, mode: str, parser: ToolParser | None, named: str | None) -> None:
        self.mode = mode
        self.parser = parser
        self.named = named
        self._streams: dict[int, ChoiceToolStream] = {}

    @classmethod
    def of(cls, body, parser: ToolParser | None) -> "ToolCalling | None":
        mode = tool_mode(body)
        if mode == "none":
            return None
        if mode == "auto" and parser is None:
            raise ValueError("tool_choice: 'auto' needs a tool-call parser, and none matches this "
                             f"model's chat template (start the server with --tool-call-parser "
                             f"{' or '.join(PARSERS)}), or use 'required' or a named function")
        named = body.tool_choice.function.name if mode == "named" else None
        return cls(mode, parser, named)

    # -- whole responses
    def message(self, text: str) -> tuple[str | None, list[ParsedCall]]:
        """(content, calls) of a finished choice."""
        if self.mode == "named":
            return None, [ParsedCall(self.named, text)]
        if self.mode == "required":
            return _required_calls(text)
        return self.parser.parse(text)

    # -- streams
    def stream(self, index: int, text: str, finished: bool) -> tuple[str | None, list[dict]]:
        """(content to send now, tool-call deltas) for one choice's new text."""
        s = self._streams.setdefault(index, ChoiceToolStream())
        if self.mode == "named":
            deltas = []
            if s.named_id is None:
                s.named_id = call_id()
                deltas.append(_first_delta(0, s.named_id, self.named))
            if text:
                deltas.append({"index": 0, "function": {"arguments": text}})
            return None, deltas
        s.held += text
        if self.mode == "required":
            if not finished:
                return None, []
            _, calls = _required_calls(s.held)
            s.sent_calls = len(calls)
            return None, _call_deltas(calls, 0)
        if not s.in_call:
            start = self.parser.call_start(s.held)
            if start is None:
                # Hold back a tail that may be the start of the marker.
                keep = _partial_marker(s.held, self.parser.start)
                out, s.held = s.held[:len(s.held) - keep], s.held[len(s.held) - keep:]
                if finished:
                    out, s.held = out + s.held, ""
                return out or None, []
            s.in_call = True
            out, s.held = s.held[:start], s.held[start:]
            content = out or None
        else:
            content = None
        deltas: list[dict] = []
        if finished or self._complete(s.held):
            rest, calls = self.parser.parse(s.held)
            if calls:
                deltas = _call_deltas(calls, s.sent_calls)
                s.sent_calls += len(calls)
                s.held, s.in_call = "", False
                if rest:   # text after the calls: content, or the start of the next call
                    more, extra = self.stream(index, rest, finished)
                    content = (content or "") + (more or "") or None
                    deltas += extra
            elif finished:
                content, s.held = (content or "") + s.held, ""
        return content, deltas

    def _complete(self, held: str) -> bool:
        return isinstance(self.parser, HermesToolParser) and HermesToolParser.end in held

    def finish_reason(self, reason: str | None, calls: bool) -> str | None:
        return "tool_calls" if calls and reason == "stop" else reason

    def streamed_calls(self, index: int) -> bool:
        s = self._streams.get(index)
        return s is not None and (s.sent_calls > 0 or s.named_id is not None)


def _required_calls(text: str) -> tuple[str | None, list[ParsedCall]]:
    try:
        items = json.loads(text)
    except ValueError:
        return text, []
    calls = [c for c in (_call_from_obj(i, "parameters") for i in items) if c is not None] \
        if isinstance(items, list) else []
    return (None, calls) if calls else (text, [])


def _first_delta(index: int, cid: str, name: str) -> dict:
    return {"index": index, "id": cid, "type": "function", "function": {"name": name, "arguments": ""}}


def _call_deltas(calls: list[ParsedCall], first_index: int) -> list[dict]:
    deltas = []
    for k, c in enumerate(calls):
        deltas.append(_first_delta(first_index + k, call_id(), c.name))
        deltas.append({"index": first_index + k, "function": {"arguments": c.arguments}})
    return deltas


def _partial_marker(text: str, marker: str) -> int:
    """How many trailing characters of ``text`` could begin ``marker``."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0
