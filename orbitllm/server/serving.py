"""The OpenAI completion and chat endpoints: request body -> engine -> JSON or SSE.

One API call may carry several prompts (completions) and ``n`` choices each; the
engine sees one request per prompt and the choices are numbered prompt-major,
as OpenAI does. Output formatting is split from running so that streaming and
non-streaming share one path through the engine.
"""
from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from dataclasses import dataclass
from typing import AsyncIterator

from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from orbitllm.outputs import CompletionOutput, PositionLogprobs
from orbitllm.sampling_params import SamplingParams
from orbitllm.server.async_engine import (AsyncEngine, EngineDeadError, RequestStream,
                                          RequestTimeoutError, StreamedOutput)
from orbitllm.server.metrics import ServerMetrics
from orbitllm.server.protocol import (AssistantMessage, ChatChoice, ChatChunkChoice,
                                      ChatCompletionChunk, ChatCompletionRequest,
                                      ChatCompletionResponse, ChatLogprobs, CompletionChoice,
                                      CompletionLogprobs, CompletionRequest, CompletionResponse,
                                      DeltaMessage, ErrorInfo, ErrorResponse, TokenLogprob,
                                      TopLogprob, Usage)

LOG_SCOPE_KEY = "orbitllm.access"     # where handlers leave fields for the access log
_MIN_LOGPROB = -9999.0                 # JSON has no -inf


class APIError(Exception):
    """An error with its HTTP status, rendered as OpenAI's ``{"error": {...}}`` body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | int | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.info = ErrorInfo(message=message, type=type, param=param, code=code)
        self.headers = headers

    def response(self) -> JSONResponse:
        return JSONResponse(ErrorResponse(error=self.info).model_dump(), self.status, self.headers)

    @classmethod
    def from_exception(cls, e: BaseException) -> APIError:
        if isinstance(e, APIError):
            return e
        if isinstance(e, ValueError):
            match = re.match(r"(\w+)\b", str(e))
            return cls(400, str(e), param=match.group(1) if match else None)
        if isinstance(e, RequestTimeoutError):
            return cls(408, "the request ran past the server's --request-timeout and was aborted",
                       type="timeout_error", code="request_timeout")
        if isinstance(e, EngineDeadError):
            return cls(503, str(e), type="service_unavailable_error")
        return cls(500, f"internal error: {type(e).__name__}: {e}", type="server_error")


@dataclass
class ServerSettings:
    served_model_names: list[str]
    model_root: str | None = None
    api_key: str | None = None
    max_num_waiting: int | None = None     # beyond it: 429
    request_timeout: float | None = None   # seconds per request; None: no limit
    log_prompts: bool = False
    retry_after_s: int = 1


@dataclass
class PromptInput:
    token_ids: list[int]
    text: str | None = None


class RequestTracker:
    """Times one API call and counts its tokens, for metrics and the access log."""

    def __init__(self, metrics: ServerMetrics, arrival: float) -> None:
        self.metrics = metrics
        self.arrival = arrival
        self.first_token_at: float | None = None
        self._last_token_at = 0.0
        self._tokens: dict[int, int] = {}      # prompt index -> tokens seen
        self.prompt_tokens = 0
        self.finish_reasons: list[str | None] = []

    @property
    def completion_tokens(self) -> int:
        return sum(self._tokens.values())

    def observe(self, index: int, item: StreamedOutput) -> None:
        out = item.output
        if index not in self._tokens:
            self._tokens[index] = 0
            self.prompt_tokens += len(out.prompt_token_ids)
            self.metrics.prompt_tokens.inc(len(out.prompt_token_ids))
            scheduled, arrived = out.metrics.get("first_scheduled_time"), out.metrics.get("arrival_time")
            if scheduled is not None and arrived is not None:
                self.metrics.request_queue_time.observe(max(0.0, scheduled - arrived))
        total = sum(len(c.token_ids) for c in out.outputs)
        new = total - self._tokens[index]
        if new > 0:
            self._tokens[index] = total
            self.metrics.generation_tokens.inc(new)
            if self.first_token_at is None:
                self.first_token_at = item.time
                self.metrics.time_to_first_token.observe(max(0.0, item.time - self.arrival))
            else:
                self.metrics.inter_token_latency.observe(max(0.0, item.time - self._last_token_at))
            self._last_token_at = item.time
        if out.finished:
            reasons = [c.finish_reason for c in out.outputs]
            self.finish_reasons.extend(reasons)
            self.metrics.request_finished(reasons[0] or "abort")
            self.metrics.e2e_request_latency.observe(time.monotonic() - self.arrival)

    def aborted(self) -> None:
        self.finish_reasons.append("abort")
        self.metrics.request_finished("abort")
        self.metrics.e2e_request_latency.observe(time.monotonic() - self.arrival)

    def log_fields(self) -> dict:
        ttft = None if self.first_token_at is None else round(self.first_token_at - self.arrival, 4)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "ttft_s": ttft, "finish_reasons": self.finish_reasons}


class Generation:
    """The engine requests of one API call (one per prompt), merged in arrival order."""

    def __init__(self, engine: AsyncEngine, request_id: str, prompts: list[PromptInput],
                 params: SamplingParams, priority: int, cache_salt: str | None,
                 deadline: float | None, tracker: RequestTracker) -> None:
        self.engine = engine
        self.request_id = request_id
        self.prompts = prompts
        self.params = params
        self.priority = priority
        self.cache_salt = cache_salt
        self.deadline = deadline
        self.tracker = tracker
        self.streams: list[RequestStream] = []

    async def start(self) -> None:
        try:
            for i, p in enumerate(self.prompts):
                self.streams.append(await self.engine.add(
                    f"{self.request_id}-{i}", {"prompt": p.text, "prompt_token_ids": p.token_ids},
                    self.params, self.priority, self.cache_salt, self.deadline))
        except BaseException:
            self.close()
            raise

    async def outputs(self) -> AsyncIterator[tuple[int, StreamedOutput]]:
        """(prompt index, output) as the engine produces them."""
        if len(self.streams) == 1:
            async for item in self.streams[0]:
                self.tracker.observe(0, item)
                yield 0, item
            return
        merged: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, stream: RequestStream) -> None:
            try:
                async for item in stream:
                    merged.put_nowait((i, item))
            except Exception as e:
                merged.put_nowait((i, e))
            merged.put_nowait((i, None))

        tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(self.streams)]
        try:
            remaining = len(tasks)
            while remaining:
                i, item = await merged.get()
                if item is None:
                    remaining -= 1
                elif isinstance(item, Exception):
                    raise item
                else:
                    self.tracker.observe(i, item)
                    yield i, item
        finally:
            for t in tasks:
                t.cancel()

    async def collect(self) -> list[StreamedOutput]:
        """The final output of every prompt."""
        finals: list[StreamedOutput | None] = [None] * len(self.prompts)
        async for i, item in self.outputs():
            finals[i] = item
        return finals

    def close(self) -> None:
        """Abort what has not finished (client gone, timeout, error): frees its KV blocks now."""
        for stream in self.streams:
            if not (stream.finished or stream.aborted):
                self.engine.abort(stream)
                self.tracker.aborted()


# ---- formatting -------------------------------------------------------------------

@dataclass
class _ChoiceState:
    """How much of one choice a stream has sent."""
    chars: int = 0
    tokens: int = 0
    started: bool = False
    finished: bool = False


@dataclass
class _Delta:
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[PositionLogprobs] | None
    choice: CompletionOutput
    first: bool
    finished: bool


class _Formatter:
    """Shared streaming bookkeeping: which text and tokens of each choice are new."""

    def __init__(self, request_id: str, model: str, n: int, num_prompts: int, tokenizer) -> None:
        self.request_id = request_id
        self.model = model
        self.n = n
        self.tokenizer = tokenizer
        self.created = int(time.time())
        self._states = [_ChoiceState() for _ in range(n * num_prompts)]

    def deltas(self, prompt_index: int, item: StreamedOutput) -> list[_Delta]:
        out = []
        for i, choice in enumerate(item.output.outputs):
            index = prompt_index * self.n + i
            st = self._states[index]
            if st.finished:
                continue
            safe = item.stream_texts[i]
            text = safe[st.chars:]
            new_ids = choice.token_ids[st.tokens:]
            finished = choice.finish_reason is not None
            lps = choice.logprobs[st.tokens:] if choice.logprobs is not None else None
            if not text and not finished and not (lps and new_ids) and st.started:
                continue
            out.append(_Delta(index, text, new_ids, lps, choice, not st.started, finished))
            st.chars, st.tokens = max(st.chars, len(safe)), len(choice.token_ids)
            st.started, st.finished = True, finished
        return out

    def piece(self, token_id: int, entry: PositionLogprobs | None) -> str:
        lp = entry.get(token_id) if entry else None
        if lp is not None and lp.decoded_token is not None:
            return lp.decoded_token
        return self.tokenizer.decode([token_id])


def _clamp(logprob: float) -> float:
    return max(logprob, _MIN_LOGPROB)


def usage_of(tracker: RequestTracker) -> Usage:
    return Usage(prompt_tokens=tracker.prompt_tokens, completion_tokens=tracker.completion_tokens,
                 total_tokens=tracker.prompt_tokens + tracker.completion_tokens)


class CompletionFormatter(_Formatter):
    """``text_completion`` bodies; ``echo`` puts the prompt (and its logprobs) first."""

    def __init__(self, request_id: str, model: str, body: CompletionRequest,
                 prompts: list[PromptInput], tokenizer) -> None:
        super().__init__(request_id, model, body.n, len(prompts), tokenizer)
        self.prompts = prompts
        self.echo = body.echo
        self.logprobs = body.logprobs
        self._offsets = [0] * (body.n * len(prompts))

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
        for tid, entry in pairs:
            token = self.piece(tid, entry)
            result.tokens.append(token)
            result.text_offset.append(self._offsets[index])
            self._offsets[index] += len(token)
            if entry is None:
                result.token_logprobs.append(None)
                result.top_logprobs.append(None)
                continue
            result.token_logprobs.append(_clamp(entry[tid].logprob))
            result.top_logprobs.append({
                self.piece(t, entry): _clamp(lp.logprob)
                for t, lp in sorted(entry.items(), key=lambda kv: kv[1].rank or 0)})
        return result

    def chunks(self, prompt_index: int, item: StreamedOutput) -> list[CompletionResponse]:
        chunks = []
        for d in self.deltas(prompt_index, item):
            echo = d.first and self.echo
            text = (self._echo_text(prompt_index) if echo else "") + d.text
            lps = self._logprobs(d.index, d.token_ids, d.logprobs, prompt_index if echo else None,
                                 item.output.prompt_logprobs)
            chunks.append(CompletionResponse(
                id=self.request_id, created=self.created, model=self.model, choices=[CompletionChoice(
                    index=d.index, text=text, logprobs=lps,
                    finish_reason=d.choice.finish_reason if d.finished else None,
                    stop_reason=d.choice.stop_reason if d.finished else None)]))
        return chunks

    def response(self, finals: list[StreamedOutput], usage: Usage) -> CompletionResponse:
        choices = []
        for p, item in enumerate(finals):
            for i, c in enumerate(item.output.outputs):
                index = p * self.n + i
                prefix = self._echo_text(p) if self.echo else ""
                lps = self._logprobs(index, c.token_ids, c.logprobs, p if self.echo else None,
                                     item.output.prompt_logprobs)
                choices.append(CompletionChoice(index=index, text=prefix + c.text, logprobs=lps,
                                                finish_reason=c.finish_reason,
                                                stop_reason=c.stop_reason))
        return CompletionResponse(id=self.request_id, created=self.created, model=self.model,
                                  choices=choices, usage=usage)

    def usage_chunk(self, usage: Usage) -> CompletionResponse:
        return CompletionResponse(id=self.request_id, created=self.created, model=self.model,
                                  choices=[], usage=usage)


class ChatFormatter(_Formatter):
    """``chat.completion`` bodies; a stream opens each choice with the assistant role."""

    def __init__(self, request_id: str, model: str, body: ChatCompletionRequest, tokenizer) -> None:
        super().__init__(request_id, model, body.n, 1, tokenizer)
        self.top_logprobs = (body.top_logprobs or 0) if body.logprobs else None

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
                index=d.index, delta=DeltaMessage(content=d.text),
                logprobs=self._logprobs(d.token_ids, d.logprobs),
                finish_reason=d.choice.finish_reason if d.finished else None,
                stop_reason=d.choice.stop_reason if d.finished else None)])
            for d in self.deltas(prompt_index, item)]

    def response(self, finals: list[StreamedOutput], usage: Usage) -> ChatCompletionResponse:
        choices = [ChatChoice(index=i, message=AssistantMessage(content=c.text),
                              logprobs=self._logprobs(c.token_ids, c.logprobs),
                              finish_reason=c.finish_reason, stop_reason=c.stop_reason)
                   for i, c in enumerate(finals[0].output.outputs)]
        return ChatCompletionResponse(id=self.request_id, created=self.created, model=self.model,
                                      choices=choices, usage=usage)

    def usage_chunk(self, usage: Usage) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=self.request_id, created=self.created, model=self.model,
                                   choices=[], usage=usage)


# ---- the endpoints ----------------------------------------------------------------

def sse(payload: BaseModel | dict, exclude: set[str] | None = None) -> str:
    body = payload if isinstance(payload, dict) else payload.model_dump(mode="json", exclude=exclude)
    return f"data: {json.dumps(body, ensure_ascii=False, separators=(',', ':'))}\n\n"


class OpenAIServing:
    """Validates a request, admits it, runs it on the engine and formats the result."""

    def __init__(self, engine: AsyncEngine, settings: ServerSettings, metrics: ServerMetrics) -> None:
        self.engine = engine
        self.settings = settings
        self.metrics = metrics
        self.tokenizer = engine.engine.tokenizer
        self.max_model_len = engine.engine.max_model_len
        self.draining = False

    # -- completions
    async def completion(self, body: CompletionRequest, request: Request) -> Response:
        arrival = time.monotonic()
        model = self._check_model(body.model)
        prompts = self._completion_prompts(body.prompt)
        params = self._params(body)
        fmt = CompletionFormatter(f"cmpl-{uuid.uuid4().hex}", model, body, prompts, self.tokenizer)
        return await self._run(body, request, prompts, params, fmt, arrival)

    def _completion_prompts(self, prompt) -> list[PromptInput]:
        if isinstance(prompt, str):
            prompt = [prompt]
        elif prompt and isinstance(prompt[0], int):
            prompt = [prompt]
        if not prompt:
            raise APIError(400, "prompt: must not be empty", param="prompt")
        return [PromptInput(self.tokenizer.encode(p) if p else [], p) if isinstance(p, str)
                else PromptInput(list(p)) for p in prompt]

    # -- chat
    async def chat(self, body: ChatCompletionRequest, request: Request) -> Response:
        arrival = time.monotonic()
        model = self._check_model(body.model)
        prompt = self._chat_prompt(body)
        params = self._params(body)
        fmt = ChatFormatter(f"chatcmpl-{uuid.uuid4().hex}", model, body, self.tokenizer)
        return await self._run(body, request, [prompt], params, fmt, arrival)

    def _chat_prompt(self, body: ChatCompletionRequest) -> PromptInput:
        if body.chat_template is None and not getattr(self.tokenizer, "chat_template", None):
            raise APIError(400, "messages: this model's tokenizer has no chat template; "
                                "pass chat_template", param="chat_template")
        conversation = [m.as_template_input() for m in body.messages]
        try:
            ids = self.tokenizer.apply_chat_template(
                conversation, chat_template=body.chat_template, tokenize=True,
                add_generation_prompt=body.add_generation_prompt and not body.continue_final_message,
                continue_final_message=body.continue_final_message)
        except Exception as e:
            raise APIError(400, f"messages: the chat template failed: {e}", param="messages") from None
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        text = self.tokenizer.decode(ids) if self.settings.log_prompts else None
        return PromptInput(list(ids), text)

    # -- shared
    def _check_model(self, name: str | None) -> str:
        names = self.settings.served_model_names
        if name is None:
            return names[0]
        if name not in names:
            raise APIError(404, f"The model `{name}` does not exist.", param="model",
                           code="model_not_found")
        return name

    def _params(self, body) -> SamplingParams:
        try:
            return body.sampling_params()
        except ValueError as e:
            raise APIError.from_exception(e) from None

    def _check_lengths(self, prompts: list[PromptInput], params: SamplingParams) -> None:
        limit = self.max_model_len
        for p in prompts:
            n = len(p.token_ids)
            if n == 0:
                raise APIError(400, "prompt: must not be empty", param="prompt")
            if n >= limit:
                raise APIError(400, f"prompt: the prompt has {n} tokens, but this model's context "
                                    f"length is {limit} tokens and must leave room for at least "
                                    "one generated token", param="prompt", code="context_length_exceeded")
            if params.max_tokens is not None and n + params.max_tokens > limit:
                raise APIError(400, f"max_tokens: the prompt has {n} tokens and max_tokens is "
                                    f"{params.max_tokens} ({n + params.max_tokens} in all), but this "
                                    f"model's context length is {limit} tokens",
                               param="max_tokens", code="context_length_exceeded")

    def _admit(self, num_prompts: int) -> None:
        if self.draining:
            raise APIError(503, "the server is shutting down", type="service_unavailable_error",
                           headers={"Connection": "close"})
        limit = self.settings.max_num_waiting
        if limit is not None and self.engine.num_waiting + num_prompts > limit:
            raise APIError(429, f"too many requests waiting (limit {limit}); retry later",
                           type="rate_limit_error", code="rate_limit_exceeded",
                           headers={"Retry-After": str(self.settings.retry_after_s)})

    async def _run(self, body, request: Request, prompts: list[PromptInput], params: SamplingParams,
                   fmt: _Formatter, arrival: float) -> Response:
        log = request.scope.setdefault(LOG_SCOPE_KEY, {})
        log.update(id=fmt.request_id, model=fmt.model, stream=body.stream, n=body.n)
        if self.settings.log_prompts:
            log["prompt"] = [p.text if p.text is not None else p.token_ids for p in prompts]
        self._check_lengths(prompts, params)
        self._admit(len(prompts))
        timeout = self.settings.request_timeout
        tracker = RequestTracker(self.metrics, arrival)
        gen = Generation(self.engine, fmt.request_id, prompts, params, body.priority,
                         body.cache_salt, None if timeout is None else arrival + timeout, tracker)
        headers = {"X-Request-Id": fmt.request_id}
        try:
            await gen.start()
        except Exception as e:
            raise APIError.from_exception(e) from None
        if body.stream:
            return StreamingResponse(self._events(gen, fmt, body.include_usage, log),
                                     media_type="text/event-stream", headers=headers)
        try:
            finals = await _unless_disconnected(request, gen.collect())
        except Exception as e:
            raise APIError.from_exception(e) from None
        finally:
            gen.close()
            log.update(tracker.log_fields())
        if finals is None:   # the client left; nobody reads a response
            return Response(status_code=499)
        return JSONResponse(fmt.response(finals, usage_of(tracker)).model_dump(mode="json"),
                            headers=headers)

    async def _events(self, gen: Generation, fmt: _Formatter, include_usage: bool,
                      log: dict) -> AsyncIterator[str]:
        no_usage = None if include_usage else {"usage"}
        try:
            if isinstance(fmt, ChatFormatter):
                yield sse(fmt.role_chunk(), no_usage)
            async for i, item in gen.outputs():
                for chunk in fmt.chunks(i, item):
                    yield sse(chunk, no_usage)
            if include_usage:
                yield sse(fmt.usage_chunk(usage_of(gen.tracker)))
        except Exception as e:
            error = APIError.from_exception(e)
            log["error"] = error.info.message
            yield sse(ErrorResponse(error=error.info))
        finally:
            gen.close()
            log.update(gen.tracker.log_fields())
        yield "data: [DONE]\n\n"


async def _unless_disconnected(request: Request, work) -> object | None:
    """Run ``work``; None (and ``work`` cancelled) if the client disconnects first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    if not task.done() or task.cancelled():
        return None
    return task.result()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
