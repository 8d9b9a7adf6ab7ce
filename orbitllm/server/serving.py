"""The OpenAI completion and chat endpoints: request body -> engine -> JSON or SSE.

One API call may carry several prompts (completions) and ``n`` choices each; the
engine sees one request per prompt and the choices are numbered prompt-major,
as OpenAI does. Output formatting (``formatting.py``) is split from running so that
streaming and non-streaming share one path through the engine.
"""
from __future__ import annotations

import asyncio
import base64
import functools
import logging
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator

import numpy as np
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from orbitllm.engine.beam_search import BeamSearchState
from orbitllm.outputs import BeamSearchOutput, PositionLogprobs
from orbitllm.sampling_params import BeamSearchParams, SamplingParams
from orbitllm.server.async_engine import (AsyncEngine, ClientTooSlowError, CoalescingQueue,
                                          EngineBusyError, EngineDeadError, OutputQueue,
                                          RequestStream, RequestTimeoutError, StreamedOutput)
from orbitllm.server.formatting import (ChatFormatter, ChoiceResult, CompletionFormatter,
                                        Formatter, PromptInput, PromptResult, best_of, sse)
from orbitllm.server.limits import (LimitedTemplateRenderer, Preprocessor, PreprocessTimeoutError,
                                    max_token_bytes, min_tokens_of)
from orbitllm.server.metrics import ServerMetrics
from orbitllm.server.structured_request import source_field
from orbitllm.server.tool_parsers import ToolCalling, parser_for, template_tools
from orbitllm.server.protocol import (ChatCompletionRequest, CompletionRequest, ErrorInfo,
                                      ErrorResponse, PromptTokensDetails, Usage)

_log = logging.getLogger(__name__)

LOG_SCOPE_KEY = "orbitllm.access"     # where handlers leave fields for the access log


def _log_unknown_fields(body) -> None:
    """One log line naming a body's unknown fields (as repr, so no newline or surrogate
    reaches the log; at most 20 names of at most 64 characters)."""
    unknown = body.unknown_fields()
    if unknown:
        more = f" and {len(unknown) - 20} more" if len(unknown) > 20 else ""
        _log.info("ignoring unknown request field(s): %s%s",
                  ", ".join(repr(name[:64]) for name in unknown[:20]), more)


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
    def from_exception(cls, e: BaseException, request_id: str | None = None) -> APIError:
        """The client's view of an error. Internal failures get a generic message and
        the request id (the traceback is in the server's log), never the exception's text."""
        if isinstance(e, APIError):
            return e
        if isinstance(e, ValueError):
            match = re.match(r"(\w+)\b", str(e))
            return cls(400, str(e), param=match.group(1) if match else None)
        if isinstance(e, RequestTimeoutError):
            return cls(408, "the request ran past the server's --request-timeout and was aborted",
                       type="timeout_error", code="request_timeout")
        if isinstance(e, PreprocessTimeoutError):
            return cls(408, f"{e}; the request was refused", type="timeout_error",
                       code="preprocess_timeout")
        if isinstance(e, ClientTooSlowError):
            return cls(408, str(e), type="timeout_error", code="client_too_slow")
        if isinstance(e, ShutdownError):
            return cls(503, str(e), type="service_unavailable_error", code="server_shutdown")
        if isinstance(e, EngineBusyError):
            return cls(503, f"the server is busy: {e}", type="service_unavailable_error",
                       code="server_busy", headers={"Retry-After": "1"})
        if isinstance(e, EngineDeadError):
            return cls(503, str(e), type="service_unavailable_error")
        where = f" (request id {request_id})" if request_id else ""
        return cls(500, f"internal server error{where}; the server's log has the details",
                   type="server_error")


class ShutdownError(RuntimeError):
    """The server's shutdown deadline passed before the request finished."""


@dataclass
class ServerSettings:
    served_model_names: list[str]
    # Also accepted, never listed: the model argument as given (a path, as vLLM names it),
    # so a client that names the model the way the server was started is not refused.
    model_aliases: list[str] = field(default_factory=list)
    api_key: str | None = None
    max_num_waiting: int | None = None     # beyond it: 429
    request_timeout: float | None = None   # seconds per request; None: no limit
    log_prompts: bool = False
    retry_after_s: int = 1
    max_request_bytes: int = 4 << 20       # beyond it: 413, before the body is parsed
    preprocess_timeout: float = 10.0       # seconds to tokenize / render one request
    preprocess_threads: int = 2
    trust_request_chat_template: bool = False
    max_stream_buffer: int = 1024          # outputs a stream may hold unread ...
    stream_stall_timeout: float = 60.0     # ... or seconds its oldest may wait, then abort
    idle_connection_timeout: float = 5.0   # a connection with no request is closed after it
    max_sequences_per_request: int = 256   # prompts x n of one completions call
    pooling: str = "last"                  # /v1/embeddings: "last" token or "mean"
    tool_call_parser: str | None = None    # hermes, llama3_json; None: from the chat template


class RequestTracker:
    """Times one API call and counts its tokens, for metrics and the access log."""

    def __init__(self, metrics: ServerMetrics, arrival: float) -> None:
        self.metrics = metrics
        self.arrival = arrival
        self.first_token_at: float | None = None
        self._last_token_at = 0.0
        self.completion_tokens = 0
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.finish_reasons: list[str | None] = []

    def observe(self, item: StreamedOutput) -> None:
        if item.first:
            self.prompt_tokens += len(item.prompt_token_ids)
            self.cached_tokens += item.num_cached_tokens
            self.metrics.prompt_tokens.inc(len(item.prompt_token_ids))
            scheduled, arrived = item.metrics.get("first_scheduled_time"), item.metrics.get("arrival_time")
            if scheduled is not None and arrived is not None:
                self.metrics.request_queue_time.observe(max(0.0, scheduled - arrived))
        new = sum(len(c.token_ids) for c in item.choices)
        if new > 0:
            self.completion_tokens += new
            self.metrics.generation_tokens.inc(new)
            if self.first_token_at is None:
                self.first_token_at = item.time
                self.metrics.time_to_first_token.observe(max(0.0, item.time - self.arrival))
            else:
                self.metrics.inter_token_latency.observe(max(0.0, item.time - self._last_token_at))
            self._last_token_at = item.time
        reasons = [c.finish_reason for c in item.choices if c.finish_reason is not None]
        self.finish_reasons.extend(reasons)
        if item.finished:
            self.metrics.request_finished(reasons[0] if reasons else "abort")
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
    """The engine requests of one API call (one per prompt), their outputs merged in
    arrival order through one bounded queue."""

    def __init__(self, engine: AsyncEngine, request_id: str, prompts: list[PromptInput],
                 params: SamplingParams, priority: int, cache_salt: str | None,
                 deadline: float | None, tracker: RequestTracker, settings: ServerSettings,
                 stream: bool) -> None:
        self.engine = engine
        self.request_id = request_id
        self.prompts = prompts
        self.params = params
        self.priority = priority
        self.cache_salt = cache_salt
        self.deadline = deadline
        self.tracker = tracker
        # A stream's reader is the client, who may stop reading: abort it past its bound.
        # A plain request's reader wants only the whole result: merge what it has not read.
        self.queue = (OutputQueue(settings.max_stream_buffer, settings.stream_stall_timeout, self.close)
                      if stream else CoalescingQueue())
        self.streams: list[RequestStream] = []

    async def start(self) -> None:
        try:
            for i, p in enumerate(self.prompts):
                stream = RequestStream(f"{self.request_id}-{i}", i, self.queue, self.params.n)
                self.streams.append(stream)
                await self.engine.add(stream, {"prompt": p.text, "prompt_token_ids": p.token_ids},
                                      self.params, self.priority, self.cache_salt)
        except BaseException:
            self.close()
            raise

    async def outputs(self) -> AsyncIterator[tuple[int, StreamedOutput]]:
        """(prompt index, output) as the engine produces them, until every prompt is done."""
        remaining = len(self.streams)
        while remaining:
            index, item = await self.queue.get(self.deadline, self.request_id)
            self.tracker.observe(item)
            if item.finished:
                remaining -= 1
            yield index, item

    async def collect(self) -> list[PromptResult]:
        """Every prompt's choices, whole."""
        results = [PromptResult([ChoiceResult() for _ in range(self.params.n)]) for _ in self.prompts]
        async for i, item in self.outputs():
            if item.first:
                results[i].prompt_logprobs = item.prompt_logprobs
            for d in item.choices:
                results[i].choices[d.index].add(d)
        return results

    def fail(self, error: BaseException) -> None:
        """Hand ``error`` to the reader and abort the engine's requests (shutdown)."""
        self.queue.put(-1, error)
        self.close()

    def close(self) -> None:
        """Abort what has not finished (client gone, timeout, error): frees its KV blocks now."""
        for stream in self.streams:
            if not (stream.finished or stream.aborted):
                self.engine.abort(stream)
                self.tracker.aborted()


def usage_of(tracker: RequestTracker) -> Usage:
    return Usage(prompt_tokens=tracker.prompt_tokens, completion_tokens=tracker.completion_tokens,
                 total_tokens=tracker.prompt_tokens + tracker.completion_tokens,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=tracker.cached_tokens))


def _truncated(prompts: list[PromptInput], params: SamplingParams) -> list[PromptInput]:
    """``truncate_prompt_tokens``: the prompts as the engine will compute them (a cut
    prompt's text no longer matches its ids, so it is dropped)."""
    k = params.truncate_prompt_tokens
    if k is None:
        return prompts
    return [p if len(p.token_ids) <= k else PromptInput(params.truncate(p.token_ids)) for p in prompts]


def _encode_embedding(vector: list[float], encoding_format: str) -> list[float] | str:
    """``base64``: the float32 little-endian bytes, as OpenAI sends (and its client reads)."""
    if encoding_format == "float":
        return vector
    return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode()


def _beam_result(prompt: PromptInput, out: BeamSearchOutput, n: int, fmt: Formatter) -> PromptResult:
    """The ``n`` best beams as choices; their logprobs cut to what the request asked for."""
    wanted = fmt.wanted_logprobs
    choices = []
    for seq in out.sequences[:n]:
        ids = seq.tokens[len(prompt.token_ids):]
        lps = None
        if wanted is not None:
            lps = [{t: lp for t, lp in e.items() if t == tid or (lp.rank or 0) <= wanted}
                   for tid, e in zip(ids, seq.logprobs)]
        choices.append(ChoiceResult(seq.text or "", ids, lps, seq.finish_reason))
    return PromptResult(choices)


# ---- the endpoints ----------------------------------------------------------------

class OpenAIServing:
    """Validates a request, admits it, runs it on the engine and formats the result.

    Nothing whose cost grows with the client's input runs on the event loop: the body
    size is capped before parsing (``BodySizeLimitMiddleware``), field checks are
    O(fields) with capped lists, and tokenization and templates go to ``Preprocessor``.
    """

    def __init__(self, engine: AsyncEngine, settings: ServerSettings, metrics: ServerMetrics) -> None:
        self.engine = engine
        self.settings = settings
        self.metrics = metrics
        self.tokenizer = engine.engine.tokenizer
        self.max_model_len = engine.engine.max_model_len
        self.draining = False
        self.preprocessor = Preprocessor(settings.preprocess_threads, settings.preprocess_timeout)
        self._max_token_bytes = max_token_bytes(self.tokenizer) if self.tokenizer is not None else 1
        self.renderer = LimitedTemplateRenderer(
            max_chars=settings.max_request_bytes, timeout_s=settings.preprocess_timeout)
        self._active: set[Generation] = set()
        self.tool_parser = parser_for(settings.tool_call_parser,
                                      getattr(self.tokenizer, "chat_template", None))

    # -- completions
    async def completion(self, body: CompletionRequest, request: Request) -> Response:
        arrival = time.monotonic()
        model = self._check_model(body.model)
        params = self._params(body)
        prompts = _truncated(await self._completion_prompts(body.prompt, params.n), params)
        fmt = CompletionFormatter(f"cmpl-{uuid.uuid4().hex}", model, body, prompts, self.tokenizer)
        if body.use_beam_search:
            return await self._run_beam_search(body, request, prompts, params, fmt, arrival)
        return await self._run(body, request, prompts, params, fmt, arrival)

    async def _completion_prompts(self, prompt, n: int) -> list[PromptInput]:
        if isinstance(prompt, str):
            prompt = [prompt]
        elif prompt and isinstance(prompt[0], int):
            prompt = [prompt]
        if not prompt:
            raise APIError(400, "prompt: must not be empty", param="prompt")
        limit = self.settings.max_sequences_per_request
        if len(prompt) * n > limit:
            raise APIError(400, f"prompt: {len(prompt)} prompts x n={n} asks for more than this "
                                f"server's {limit} sequences per request", param="prompt")
        texts = [p for p in prompt if isinstance(p, str)]
        for text in texts:
            self._check_text_size("prompt", text)
        if texts and self.tokenizer is None:
            raise APIError(400, "prompt: this server has no tokenizer; send token ids", param="prompt")
        encoded = iter(await self._preprocess(
            lambda: [self.tokenizer.encode(t) if t else [] for t in texts]) if texts else [])
        return [PromptInput(next(encoded), p) if isinstance(p, str) else PromptInput(list(p))
                for p in prompt]

    # -- chat
    async def chat(self, body: ChatCompletionRequest, request: Request) -> Response:
        arrival = time.monotonic()
        model = self._check_model(body.model)
        params = self._params(body)
        try:
            tools = ToolCalling.of(body, self.tool_parser)
        except ValueError as e:
            raise APIError.from_exception(e) from None
        prompt = _truncated([await self._chat_prompt(body)], params)[0]
        fmt = ChatFormatter(f"chatcmpl-{uuid.uuid4().hex}", model, body, self.tokenizer, tools)
        if body.use_beam_search:
            return await self._run_beam_search(body, request, [prompt], params, fmt, arrival)
        return await self._run(body, request, [prompt], params, fmt, arrival)

    async def _chat_prompt(self, body: ChatCompletionRequest) -> PromptInput:
        if body.chat_template is not None and not self.settings.trust_request_chat_template:
            raise APIError(400, "chat_template: this server does not run chat templates sent by "
                                "clients (start it with --trust-request-chat-template)",
                           param="chat_template")
        if body.chat_template is None and not getattr(self.tokenizer, "chat_template", None):
            raise APIError(400, "messages: this model's tokenizer has no chat template; "
                                "pass chat_template", param="chat_template")
        return await self._preprocess(functools.partial(self._render_chat, body))

    def _render_chat(self, body: ChatCompletionRequest) -> PromptInput:
        """The request's prompt through its template (its own, or the model's) with its
        tools and ``chat_template_kwargs`` either way; a worker thread, as the cost
        grows with the messages."""
        conversation = [m.as_template_input() for m in body.messages]
        add_generation_prompt = body.add_generation_prompt and not body.continue_final_message
        tools, kwargs = template_tools(body), body.chat_template_kwargs or {}
        if body.chat_template is not None:
            ids = self._render_request_template(body.chat_template, conversation,
                                                add_generation_prompt, body.continue_final_message,
                                                tools, kwargs)
        else:
            ids = self._render_model_template(conversation, add_generation_prompt,
                                              body.continue_final_message, tools, kwargs)
        return PromptInput(ids, self.tokenizer.decode(ids) if self.settings.log_prompts else None)

    def _render_model_template(self, conversation: list[dict], add_generation_prompt: bool,
                               continue_final_message: bool, tools: list[dict] | None = None,
                               kwargs: dict | None = None) -> list[int]:
        """The model's own template (trusted), rendered and tokenized; a worker thread."""
        try:
            ids = self.tokenizer.apply_chat_template(
                conversation, tools=tools, tokenize=True, add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message, **(kwargs or {}))
        except Exception as e:
            raise APIError(400, f"messages: the chat template failed: {e}", param="messages") from None
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return list(ids)

    def _render_request_template(self, source: str, conversation: list[dict],
                                 add_generation_prompt: bool, continue_final_message: bool,
                                 tools: list[dict] | None, kwargs: dict) -> list[int]:
        """A client's template under the sandbox's limits, given what the model's template
        is given (Hugging Face's variables: special tokens, overridable by kwargs, and
        ``tools``); a worker thread."""
        specials = {k: v for k, v in self.tokenizer.special_tokens_map.items() if isinstance(v, str)}
        text = self.renderer.render(source, conversation, {**specials, **kwargs, "tools": tools},
                                    add_generation_prompt)
        if continue_final_message and conversation and conversation[-1]["content"]:
            end = text.rfind(conversation[-1]["content"].strip())
            if end >= 0:
                text = text[:end + len(conversation[-1]["content"].strip())]
        return self.tokenizer.encode(text, add_special_tokens=False)

    async def _compile(self, body, params: SamplingParams) -> None:
        """Compile the output constraint on a preprocessing thread (the engine finds it
        in its cache); a bad one is a 400 naming the request's field."""
        try:
            await self._preprocess(functools.partial(self.engine.engine.structured.compile,
                                                     params.structured_outputs))
        except APIError as e:
            field = source_field(body)
            message = re.sub(r"^structured_outputs\.\w+", field, e.info.message)
            raise APIError(400, message, param=field.split(".")[0]) from None

    async def _preprocess(self, fn):
        try:
            return await self.preprocessor.run(fn)
        except (APIError, ValueError, PreprocessTimeoutError) as e:
            raise APIError.from_exception(e) from None

    def _check_text_size(self, name: str, text: str) -> None:
        """Refuse a text that cannot fit the context whatever it tokenizes to."""
        least = min_tokens_of(text, self._max_token_bytes)
        if least >= self.max_model_len:
            raise APIError(400, f"{name}: {len(text)} characters are at least {least} tokens, but "
                                f"this model's context length is {self.max_model_len} tokens",
                           param=name, code="context_length_exceeded")

    # -- issue 22: /v1/embeddings
    async def embeddings(self, body, request: Request) -> Response:
        """OpenAI's embeddings response: the pooled final hidden state of each input."""
        model = self._check_model(body.model)
        _log_unknown_fields(body)
        if body.dimensions is not None:
            raise APIError(400, "dimensions: not supported (the embedding is the model's hidden "
                                "size)", param="dimensions")
        if not body.input:
            raise APIError(400, "input: must not be empty", param="input")
        prompts = await self._completion_prompts(body.input, 1)
        params = SamplingParams(max_tokens=1)
        self._check_lengths(prompts, params)
        self._admit(len(prompts))
        request_id = f"embd-{uuid.uuid4().hex}"
        timeout = self.settings.request_timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        queue = CoalescingQueue()
        streams = [RequestStream(f"{request_id}-{i}", i, queue, 1) for i in range(len(prompts))]

        async def run() -> list:
            for stream, p in zip(streams, prompts):
                await self.engine.add(stream, {"prompt_token_ids": p.token_ids}, params,
                                      body.priority, pooling=self.settings.pooling)
            vectors = [None] * len(streams)
            for _ in streams:
                i, out = await queue.get(deadline, request_id)
                vectors[i] = out.embedding
            return vectors

        try:
            vectors = await _unless_disconnected(request, run())
        except Exception as e:
            raise APIError.from_exception(e, request_id) from None
        finally:
            for stream in streams:
                if not stream.finished and not stream.aborted:
                    self.engine.abort(stream)
        if vectors is None:
            return Response(status_code=499)
        tokens = sum(len(p.token_ids) for p in prompts)
        data = [{"object": "embedding", "index": i, "embedding": _encode_embedding(v, body.encoding_format)}
                for i, v in enumerate(vectors)]
        return JSONResponse({"object": "list", "data": data, "model": model,
                             "usage": {"prompt_tokens": tokens, "total_tokens": tokens}},
                            headers={"X-Request-Id": request_id})

    # -- issue 22: /tokenize and /detokenize
    async def tokenize(self, body) -> dict:
        self._check_model(body.model)
        _log_unknown_fields(body)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "prompt: give exactly one of prompt and messages", param="prompt")
        if self.tokenizer is None:
            raise APIError(400, "prompt: this server has no tokenizer", param="prompt")
        if body.prompt is not None:
            self._check_text_size("prompt", body.prompt)
            ids = await self._preprocess(lambda: self.tokenizer.encode(
                body.prompt, add_special_tokens=body.add_special_tokens))
        else:
            if not getattr(self.tokenizer, "chat_template", None):
                raise APIError(400, "messages: this model's tokenizer has no chat template",
                               param="messages")
            ids = await self._preprocess(lambda: self._render_model_template(
                [m.as_template_input() for m in body.messages],
                body.add_generation_prompt and not body.continue_final_message,
                body.continue_final_message))
        return {"count": len(ids), "max_model_len": self.max_model_len, "tokens": list(ids)}

    async def detokenize(self, body) -> dict:
        self._check_model(body.model)
        _log_unknown_fields(body)
        if self.tokenizer is None:
            raise APIError(400, "tokens: this server has no tokenizer", param="tokens")
        if len(body.tokens) > self.max_model_len:
            raise APIError(400, f"tokens: {len(body.tokens)} tokens, more than the context "
                                f"length {self.max_model_len}", param="tokens")
        return {"prompt": await self._preprocess(functools.partial(self._decode, body.tokens))}

    def _decode(self, tokens: list[int]) -> str:
        """/detokenize's ids checked and decoded; a worker thread."""
        vocab = self.engine.engine.vocab_size
        bad = next((t for t in tokens if not 0 <= t < vocab), None)
        if bad is not None:
            raise APIError(400, f"tokens: {bad} is outside the vocabulary (0..{vocab - 1})",
                           param="tokens")
        return self.tokenizer.decode(tokens)

    # -- shared
    def _check_model(self, name: str | None) -> str:
        names = self.settings.served_model_names
        if name is None:
            return names[0]
        if name not in names and name not in self.settings.model_aliases:
            raise APIError(404, f"The model `{name}` does not exist.", param="model",
                           code="model_not_found")
        return name

    def _params(self, body) -> SamplingParams:
        """Every field checked (SamplingParams, then the engine's model-dependent checks)
        before anything is built per prompt or per choice."""
        max_n = self.engine.engine.config.max_n
        if isinstance(body.best_of, int) and body.best_of > max_n:
            raise APIError(400, f"best_of: at most {max_n} sequences per prompt (--max-n), "
                                f"got {body.best_of}", param="best_of")
        _log_unknown_fields(body)
        try:
            params = body.sampling_params()
            self.engine.engine.check_params(params, body.priority)
        except ValueError as e:
            raise APIError.from_exception(e) from None
        return params

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

    def cut_all(self) -> None:
        """The shutdown deadline: end every call still running with an error its client sees."""
        for gen in list(self._active):
            gen.fail(ShutdownError("the server shut down before the request finished"))

    # -- issue 22: use_beam_search ------------------------------------------------------
    async def _run_beam_search(self, body, request: Request, prompts: list[PromptInput],
                               params: SamplingParams, fmt: Formatter, arrival: float) -> Response:
        """Each prompt's beam search (as ``LLM.beam_search``) over the async engine; the
        ``n`` best beams are the choices. Not streamed: the best beams are known at the end."""
        log = request.scope.setdefault(LOG_SCOPE_KEY, {})
        log.update(id=fmt.request_id, model=fmt.model, stream=False, n=body.n, beam_search=True)
        self._check_lengths(prompts, params)
        longest = max(len(p.token_ids) for p in prompts)
        try:
            beam = body.beam_search_params(params.max_tokens or self.max_model_len - longest)
            self.engine.engine.check_params(SamplingParams(n=beam.beam_width,
                                                           logprobs=2 * beam.beam_width))
        except ValueError as e:
            raise APIError.from_exception(e) from None
        self._admit(len(prompts))
        timeout = self.settings.request_timeout
        deadline = None if timeout is None else arrival + timeout
        searches = [self._beam_search(f"{fmt.request_id}-{i}", p, beam, body, deadline)
                    for i, p in enumerate(prompts)]
        try:
            outs = await _unless_disconnected(request, asyncio.gather(*searches))
        except Exception as e:
            raise APIError.from_exception(e, fmt.request_id) from None
        if outs is None:
            return Response(status_code=499)
        results = [_beam_result(p, out, body.n, fmt) for p, out in zip(prompts, outs)]
        completion = sum(len(c.token_ids) for r in results for c in r.choices)
        prompt_tokens = sum(len(p.token_ids) for p in prompts)
        usage = Usage(prompt_tokens=prompt_tokens, completion_tokens=completion,
                      total_tokens=prompt_tokens + completion,
                      prompt_tokens_details=PromptTokensDetails(cached_tokens=0))
        log.update(prompt_tokens=prompt_tokens, completion_tokens=completion)
        return JSONResponse(fmt.response(results, usage).model_dump(mode="json"),
                            headers={"X-Request-Id": fmt.request_id})

    async def _beam_search(self, request_id: str, prompt: PromptInput, params: BeamSearchParams,
                           body, deadline: float | None) -> BeamSearchOutput:
        state = BeamSearchState(prompt.token_ids, params, self.engine.engine.eos_token_ids)
        step_params = state.step_params()
        held: dict[str, RequestStream] = {}   # requests whose blocks a live beam may fork from
        try:
            while not state.done:
                queue = CoalescingQueue()
                streams = [RequestStream(f"{request_id}-s{state.steps}-b{j}", j, queue, 1)
                           for j in range(len(state.beams))]
                for stream, b in zip(streams, state.beams):
                    await self.engine.add(stream, {"prompt_token_ids": b.tokens}, step_params,
                                          body.priority, body.cache_salt, keep_blocks=True,
                                          fork_from=b.request_id)
                    held[stream.request_id] = stream
                entries: list[PositionLogprobs | None] = [None] * len(streams)
                remaining = len(streams)
                while remaining:
                    j, item = await queue.get(deadline, request_id)
                    for c in item.choices:
                        if c.logprobs:
                            entries[j] = c.logprobs[0]
                    remaining -= item.finished
                state.advance(entries, [st.request_id for st in streams])
                wanted = {b.request_id for b in state.beams}
                for rid in [r for r in held if r not in wanted]:
                    self.engine.release(held.pop(rid).request_id)
        finally:   # also on cancellation: plain commands, nothing awaited
            for rid, stream in held.items():
                if not stream.finished:
                    self.engine.abort(stream)
                self.engine.release(rid)
        return state.output(self.tokenizer.decode if self.tokenizer is not None else None)

    async def _run(self, body, request: Request, prompts: list[PromptInput], params: SamplingParams,
                   fmt: Formatter, arrival: float) -> Response:
        log = request.scope.setdefault(LOG_SCOPE_KEY, {})
        log.update(id=fmt.request_id, model=fmt.model, stream=body.stream, n=body.n)
        if self.settings.log_prompts:
            log["prompt"] = [p.text if p.text is not None else p.token_ids for p in prompts]
        self._check_lengths(prompts, params)
        if params.structured_outputs is not None:   # compiled here, off the engine's loop
            await self._compile(body, params)
        self._admit(len(prompts))
        timeout = self.settings.request_timeout
        tracker = RequestTracker(self.metrics, arrival)
        gen = Generation(self.engine, fmt.request_id, prompts, params, body.priority,
                         body.cache_salt, None if timeout is None else arrival + timeout, tracker,
                         self.settings, body.stream)
        headers = {"X-Request-Id": fmt.request_id}
        try:
            await gen.start()
        except Exception as e:
            raise APIError.from_exception(e, fmt.request_id) from None
        self._active.add(gen)
        if body.stream:
            return StreamingResponse(self._events(gen, fmt, body.include_usage, log),
                                     media_type="text/event-stream", headers=headers)
        try:
            results = await _unless_disconnected(request, gen.collect())
        except Exception as e:
            if not isinstance(e, (ValueError, TimeoutError, ShutdownError)):
                _log.error("request %s failed: %s", fmt.request_id, e)
            raise APIError.from_exception(e, fmt.request_id) from None
        finally:
            self._active.discard(gen)
            gen.close()
            log.update(tracker.log_fields())
        if results is None:   # the client left; nobody reads a response
            return Response(status_code=499)
        if params.n > body.n:
            results = [best_of(r, body.n) for r in results]
        return JSONResponse(fmt.response(results, usage_of(tracker)).model_dump(mode="json"),
                            headers=headers)

    async def _events(self, gen: Generation, fmt: Formatter, include_usage: bool,
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
            error = APIError.from_exception(e, fmt.request_id)
            log["error"] = error.info.message
            yield sse(ErrorResponse(error=error.info))
        finally:
            self._active.discard(gen)
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
