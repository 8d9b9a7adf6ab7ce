"""OpenAI response bodies from engine outputs: whole responses and streamed chunks.

A formatter turns one API call's outputs (``StreamedOutput`` deltas, or the merged
``PromptResult`` of a plain response) into OpenAI's ``text_completion`` or
``chat.completion`` shapes; it keeps only the bookkeeping a stream needs (which choices
have started, text offsets), so streaming and plain responses share one formatting path.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

from pydantic import BaseModel

from orbitllm.outputs import PositionLogprobs
from orbitllm.server.async_engine import ChoiceDelta, StreamedOutput
from orbitllm.server.protocol import (AssistantMessage, ChatChoice, ChatChunkChoice,
                                      ChatCompletionChunk, ChatCompletionRequest,
                                      ChatCompletionResponse, ChatLogprobs, CompletionChoice,
                                      CompletionLogprobs, CompletionRequest, CompletionResponse,
                                      DeltaMessage, FunctionCall, PromptLogprob, PromptLogprobs,
                                      TokenLogprob, ToolCall, TopLogprob, Usage)
from orbitllm.server.tool_parsers import ToolCalling, call_id

_MIN_LOGPROB = -9999.0                 # JSON has no -inf


@dataclass
class PromptInput:
    token_ids: list[int]
    text: str | None = None


@dataclass
class ChoiceResult:
    """One choice, put together from its deltas (non-streaming responses)."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[PositionLogprobs] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    def add(self, d: ChoiceDelta) -> None:
        self.text += d.text
        self.token_ids += d.token_ids
        if d.logprobs is not None:
            self.logprobs = (self.logprobs or []) + d.logprobs
        if d.finish_reason is not None:
            self.finish_reason, self.stop_reason = d.finish_reason, d.stop_reason


@dataclass
class PromptResult:
    choices: list[ChoiceResult]
    prompt_logprobs: list[PositionLogprobs | None] | None = None


@dataclass
class _Delta:
    index: int            # the choice's index in the response (prompt-major)
    choice: ChoiceDelta
    first: bool


class Formatter:
    """Shared streaming bookkeeping: which choices have started."""

    def __init__(self, request_id: str, model: str, n: int, tokenizer, wants_logprobs: bool) -> None:
        self.request_id = request_id
        self.model = model
        self.n = n
        self.tokenizer = tokenizer
        self.wants_logprobs = wants_logprobs
        self.created = int(time.time())
        self._started: set[int] = set()

    def deltas(self, prompt_index: int, item: StreamedOutput) -> list[_Delta]:
        """The chunks worth sending: a token whose text is held back (it may start a stop
        string) makes no chunk unless its logprobs are wanted."""
        out = []
        for c in item.choices:
            index = prompt_index * self.n + c.index
            first = index not in self._started
            if (not first and not c.text and c.finish_reason is None
                    and not (self.wants_logprobs and c.token_ids)):
                continue
            out.append(_Delta(index, c, first))
            self._started.add(index)
        return out

    def piece(self, token_id: int, entry: PositionLogprobs | None) -> str:
        lp = entry.get(token_id) if entry else None
        if lp is not None and lp.decoded_token is not None:
            return lp.decoded_token
        return self.tokenizer.decode([token_id])


def _clamp(logprob: float) -> float:
    return max(logprob, _MIN_LOGPROB)


def prompt_logprobs_json(entries: list[PositionLogprobs | None] | None,
                         wanted: bool) -> PromptLogprobs | None:
    """vLLM's ``prompt_logprobs``: per prompt position, token id -> logprob, rank, text."""
    if not wanted or entries is None:
        return None
    return [None if e is None else {str(t): PromptLogprob(logprob=_clamp(lp.logprob), rank=lp.rank,
                                                          decoded_token=lp.decoded_token)
                                    for t, lp in e.items()} for e in entries]


def best_of(result: PromptResult, n: int) -> PromptResult:
    """The ``n`` choices of ``best_of`` with the highest cumulative logprob (vLLM's rule),
    in that order."""
    def score(c: ChoiceResult) -> float:
        return sum(e[t].logprob for t, e in zip(c.token_ids, c.logprobs or []))
    return PromptResult(sorted(result.choices, key=score, reverse=True)[:n], result.prompt_logprobs)


class CompletionFormatter(Formatter):
    """``text_completion`` bodies; ``echo`` puts the prompt (and its logprobs) first."""

    def __init__(self, request_id: str, model: str, body: CompletionRequest,
                 prompts: list[PromptInput], tokenizer) -> None:
        super().__init__(request_id, model, body.n, tokenizer, body.logprobs is not None)
        self.prompts = prompts
        self.echo = body.echo
        self.logprobs = body.logprobs
        self.prompt_logprobs = body.prompt_logprobs is not None
        self.wanted_logprobs = body.logprobs
        self._offsets: dict[int, int] = {}
        self._prompt_logprobs: dict[int, list | None] = {}

    def _echo_text(self, prompt_index: int) -> str:
        p = self.prompts[prompt_index]
        return p.text if p.text is not None else self.tokenizer.decode(p.token_ids)

    def _logprobs(self, index: int, ids: list[int], entries, prompt_index: int | None,
                  prompt_entries) -> CompletionLogprobs | None:
        if self.logprobs is None:
            return None
        result = CompletionLogprobs()
        pairs = []
        if prompt_index is not None:
            p_ids = self.prompts[prompt_index].token_ids
            p_entries = list(prompt_entries or []) + [None] * (len(p_ids) - len(prompt_entries or []))
            pairs += list(zip(p_ids, p_entries))
        pairs += list(zip(ids, entries or [None] * len(ids)))
        offset = self._offsets.get(index, 0)
        for tid, entry in pairs:
            token = self.piece(tid, entry)
            result.tokens.append(token)
            result.text_offset.append(offset)
            offset += len(token)
            if entry is None:
                result.token_logprobs.append(None)
                result.top_logprobs.append(None)
                continue
            result.token_logprobs.append(_clamp(entry[tid].logprob))
            result.top_logprobs.append({
                self.piece(t, entry): _clamp(lp.logprob)
                for t, lp in sorted(entry.items(), key=lambda kv: kv[1].rank or 0)})
        self._offsets[index] = offset
        return result

    def chunks(self, prompt_index: int, item: StreamedOutput) -> list[CompletionResponse]:
        if item.first:
            self._prompt_logprobs[prompt_index] = item.prompt_logprobs
        chunks = []
        for d in self.deltas(prompt_index, item):
            c, echo = d.choice, d.first and self.echo
            text = (self._echo_text(prompt_index) if echo else "") + c.text
            lps = self._logprobs(d.index, c.token_ids, c.logprobs, prompt_index if echo else None,
                                 self._prompt_logprobs.get(prompt_index))
            prompt_lps = prompt_logprobs_json(self._prompt_logprobs.get(prompt_index),
                                              self.prompt_logprobs and d.first)
            chunks.append(CompletionResponse(
                id=self.request_id, created=self.created, model=self.model, choices=[CompletionChoice(
                    index=d.index, text=text, logprobs=lps, finish_reason=c.finish_reason,
                    stop_reason=c.stop_reason, prompt_logprobs=prompt_lps)]))
        return chunks

    def response(self, results: list[PromptResult], usage: Usage) -> CompletionResponse:
        choices = []
        for p, result in enumerate(results):
            for i, c in enumerate(result.choices):
                index = p * self.n + i
                prefix = self._echo_text(p) if self.echo else ""
                lps = self._logprobs(index, c.token_ids, c.logprobs, p if self.echo else None,
                                     result.prompt_logprobs)
                choices.append(CompletionChoice(
                    index=index, text=prefix + c.text, logprobs=lps, finish_reason=c.finish_reason,
                    stop_reason=c.stop_reason,
                    prompt_logprobs=prompt_logprobs_json(result.prompt_logprobs, self.prompt_logprobs)))
        return CompletionResponse(id=self.request_id, created=self.created, model=self.model,
                                  choices=choices, usage=usage)

    def usage_chunk(self, usage: Usage) -> CompletionResponse:
        return CompletionResponse(id=self.request_id, created=self.created, model=self.model,
                                  choices=[], usage=usage)


class ChatFormatter(Formatter):
    """``chat.completion`` bodies; a stream opens each choice with the assistant role."""

    def __init__(self, request_id: str, model: str, body: ChatCompletionRequest, tokenizer,
                 tools: ToolCalling | None = None) -> None:
        super().__init__(request_id, model, body.n, tokenizer, body.logprobs)
        self.top_logprobs = (body.top_logprobs or 0) if body.logprobs else None
        self.prompt_logprobs = body.prompt_logprobs is not None
        self.wanted_logprobs = self.top_logprobs
        self.tools = tools

    def _logprobs(self, ids: list[int], entries) -> ChatLogprobs | None:
        if self.top_logprobs is None:
            return None
        content = []
        for tid, entry in zip(ids, entries or []):
            tops = sorted((lp.rank or 0, t, lp) for t, lp in entry.items()
                          if lp.rank is not None and lp.rank <= self.top_logprobs)
            token = self.piece(tid, entry)
            content.append(TokenLogprob(
                token=token, logprob=_clamp(entry[tid].logprob), bytes=list(token.encode()),
                top_logprobs=[TopLogprob(token=self.piece(t, entry), logprob=_clamp(lp.logprob),
                                         bytes=list(self.piece(t, entry).encode()))
                              for _, t, lp in tops]))
        return ChatLogprobs(content=content)

    def role_chunk(self) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=self.request_id, created=self.created, model=self.model,
                                   choices=[ChatChunkChoice(index=i, delta=DeltaMessage(
                                       role="assistant", content="")) for i in range(self.n)])

    def chunks(self, prompt_index: int, item: StreamedOutput) -> list[ChatCompletionChunk]:
        return [ChatCompletionChunk(
            id=self.request_id, created=self.created, model=self.model, choices=[ChatChunkChoice(
                index=d.index, delta=self._delta(d),
                logprobs=self._logprobs(d.choice.token_ids, d.choice.logprobs),
                finish_reason=self._finish_reason(d), stop_reason=d.choice.stop_reason)])
            for d in self.deltas(prompt_index, item)]

    def _delta(self, d: _Delta) -> DeltaMessage:
        if self.tools is None:
            return DeltaMessage(content=d.choice.text)
        content, calls = self.tools.stream(d.index, d.choice.text, d.choice.finish_reason is not None)
        return DeltaMessage(content=content, tool_calls=calls or None)

    def _finish_reason(self, d: _Delta) -> str | None:
        reason = d.choice.finish_reason
        return reason if self.tools is None else self.tools.finish_reason(
            reason, self.tools.streamed_calls(d.index))

    def _message(self, c: ChoiceResult) -> tuple[AssistantMessage, str | None]:
        if self.tools is None:
            return AssistantMessage(content=c.text), c.finish_reason
        content, calls = self.tools.message(c.text)
        message = AssistantMessage(content=content, tool_calls=[
            ToolCall(id=call_id(), function=FunctionCall(name=k.name, arguments=k.arguments))
            for k in calls])
        return message, self.tools.finish_reason(c.finish_reason, bool(calls))

    def response(self, results: list[PromptResult], usage: Usage) -> ChatCompletionResponse:
        choices = [ChatChoice(index=i, message=message,
                              logprobs=self._logprobs(c.token_ids, c.logprobs),
                              finish_reason=reason, stop_reason=c.stop_reason)
                   for i, c in enumerate(results[0].choices) for message, reason in [self._message(c)]]
        return ChatCompletionResponse(
            id=self.request_id, created=self.created, model=self.model, choices=choices, usage=usage,
            prompt_logprobs=prompt_logprobs_json(results[0].prompt_logprobs, self.prompt_logprobs))

    def usage_chunk(self, usage: Usage) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=self.request_id, created=self.created, model=self.model,
                                   choices=[], usage=usage)


def sse(payload: BaseModel | dict, exclude: set[str] | None = None) -> str:
    body = payload if isinstance(payload, dict) else payload.model_dump(mode="json", exclude=exclude)
    return f"data: {json.dumps(body, ensure_ascii=False, separators=(',', ':'))}\n\n"
