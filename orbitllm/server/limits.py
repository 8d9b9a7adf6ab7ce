"""Bounds on the work one HTTP request can cause before it reaches the engine.

A request's body size is checked before it is parsed; tokenization and chat-template
rendering run on a small thread pool, never on the event loop, under a time limit;
a connection that never sends a request is closed; a chat template supplied by the
client runs only if the operator allows it, and then in a sandbox that caps its
output, its arithmetic on sequences, its run time and its memory growth.
"""
from __future__ import annotations

import asyncio
import functools
import json
import os
import re
import resource
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Callable

from jinja2.exceptions import SecurityError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from uvicorn.protocols.http.h11_impl import H11Protocol


class RequestTooLargeError(Exception):
    """The body is longer than ``--max-request-bytes``."""


class PreprocessTimeoutError(TimeoutError):
    """Tokenizing or rendering one request took longer than its limit."""


# ---- body size ------------------------------------------------------------------------

class BodySizeLimitMiddleware:
    """413 for a body over ``max_bytes``: a declared Content-Length is refused before
    anything is read, a chunked body as soon as it passes the limit. The body read so
    far is replayed to the app, so a body is buffered at most once and never beyond
    the limit."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await _too_large(send, self.max_bytes)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":   # the client left while sending
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await _too_large(send, self.max_bytes)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def _too_large(send, limit: int) -> None:
    body = json.dumps({"error": {
        "message": f"the request body is larger than this server's limit of {limit} bytes "
                   "(--max-request-bytes)", "type": "invalid_request_error", "param": None,
        "code": "request_too_large"}}).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"connection", b"close"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


# ---- idle connections -------------------------------------------------------------------

class IdleTimeoutH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, but a connection that sends nothing after it opens is
    closed after the keep-alive timeout too (uvicorn arms that timer only after a
    response, so a silent connection would hold its socket forever)."""

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.timeout_keep_alive_task = self.loop.call_later(
            self.timeout_keep_alive, self.timeout_keep_alive_handler)


# ---- preprocessing off the event loop ----------------------------------------------------

class Preprocessor:
    """Runs tokenization and template rendering on a bounded pool of threads. The
    tokenizer's Rust code releases the GIL, so the event loop keeps serving meanwhile.
    A job past its time limit answers the client at once; its thread finishes on its
    own (inputs are bounded by the body size, templates stop themselves)."""

    def __init__(self, num_threads: int, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._pool = ThreadPoolExecutor(num_threads, thread_name_prefix="orbitllm-preprocess")
        self._slots = asyncio.Semaphore(4 * num_threads)   # jobs queued or running

    async def run(self, fn: Callable, *args):
        deadline = time.monotonic() + self.timeout_s
        async with self._slots:
            future = asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)
            try:
                return await asyncio.wait_for(future, max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                raise PreprocessTimeoutError(
                    f"preparing the prompt took longer than {self.timeout_s:g} s") from None

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def min_tokens_of(text: str, max_token_bytes: int) -> int:
    """A lower bound on how many tokens ``text`` becomes: no token covers more characters
    than its own UTF-8 spelling has bytes (halved for normalizers that merge characters).
    Lets a prompt far over the context length be refused without tokenizing it."""
    return len(text) // (2 * max_token_bytes)


def max_token_bytes(tokenizer) -> int:
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    return max((len(t.encode("utf-8", "replace")) for t in tokens if t), default=1)


# ---- client-supplied chat templates -------------------------------------------------------

class TemplateLimitError(ValueError):
    """A client's chat template went past a limit (output, run time, memory, arithmetic)."""


class LimitedTemplateRenderer:
    """Renders a chat template sent by a client (only with --trust-request-chat-template).

    Jinja's sandbox stops escapes but not exhaustion, so this one also: caps the
    rendered text; refuses ``*``, ``+``, ``%`` and ``**`` whose result would pass that cap
    and calls with huge integer arguments (``'a'.ljust(10**10)``) before they allocate;
    and traces the render so that it stops at its deadline or once the process's
    memory has grown by ``max_memory_bytes`` (loops of ``~`` that double a string).
    The variables are those Hugging Face templates expect."""

    def __init__(self, max_chars: int, timeout_s: float, max_memory_bytes: int = 64 << 20) -> None:
        self.max_chars = max_chars
        self.timeout_s = timeout_s
        self.max_memory_bytes = max_memory_bytes
        self._env = _LimitedEnvironment(max_chars)

    def render(self, source: str, messages: list[dict], variables: dict,
               add_generation_prompt: bool) -> str:
        """``variables``: the rest of what the template reads (special tokens, tools, ...)."""
        try:
            template = self._env.from_string(source)
        except Exception as e:
            raise ValueError(f"chat_template: does not compile: {e}") from None
        deadline = time.monotonic() + self.timeout_s
        rss_start = _rss_bytes()
        events = 0

        def trace(frame, event, arg):
            nonlocal events
            events += 1
            if events % 32 == 0:
                if time.monotonic() > deadline:
                    raise TemplateLimitError(f"chat_template: rendering took longer than {self.timeout_s:g} s")
                if _rss_bytes() - rss_start > self.max_memory_bytes:
                    raise TemplateLimitError("chat_template: rendering used too much memory")
            return trace

        parts, size = [], 0
        sys.settrace(trace)
        try:
            for piece in template.generate(messages=messages, add_generation_prompt=add_generation_prompt,
                                           **variables):
                size += len(piece)
                if size > self.max_chars:
                    raise TemplateLimitError(f"chat_template: the rendered prompt passed {self.max_chars} characters")
                parts.append(piece)
        except (TemplateLimitError, SecurityError) as e:
            raise TemplateLimitError(str(e) if isinstance(e, TemplateLimitError)
                                     else f"chat_template: {e}") from None
        except Exception as e:
            raise ValueError(f"chat_template: rendering failed: {type(e).__name__}: {e}") from None
        finally:
            sys.settrace(None)
        return "".join(parts)


_MAX_INT_ARG = 1 << 20
_BIG_WIDTH = re.compile(r"\d{7,}")


class _LimitedEnvironment(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset(["*", "+", "%", "**"])

    def __init__(self, max_chars: int) -> None:
        super().__init__(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        self.max_chars = max_chars
        self.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(
            x, indent=indent, ensure_ascii=ensure_ascii)
        self.globals["raise_exception"] = _raise
        self.filters = {name: _checked(f) for name, f in self.filters.items()}
        self.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)

    def call_binop(self, context, operator, left, right):
        if operator == "*":
            seq, count = (left, right) if isinstance(left, (str, list, tuple)) else (right, left)
            if isinstance(seq, (str, list, tuple)) and isinstance(count, int) \
                    and len(seq) * count > self.max_chars:
                raise SecurityError("repeating a sequence past the output limit")
        elif operator == "+" and isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)):
            if len(left) + len(right) > self.max_chars:
                raise SecurityError("joining sequences past the output limit")
        elif operator == "%" and isinstance(left, str) and _BIG_WIDTH.search(left):
            raise SecurityError("a format width past the output limit")
        elif operator == "**" and isinstance(left, int) and isinstance(right, int) \
                and abs(left) > 1 and right > 64:
            raise SecurityError("a power too large")
        return super().call_binop(context, operator, left, right)

    def call(__self, __context, __obj, *args, **kwargs):
        _check_args(args, kwargs)
        return super().call(__context, __obj, *args, **kwargs)

    def getattr(self, obj, attribute):
        if isinstance(obj, str) and attribute in ("format", "format_map") and _BIG_WIDTH.search(obj):
            raise SecurityError("a format width past the output limit")
        return super().getattr(obj, attribute)



def _checked(fn):
    """A filter that refuses huge integer arguments (``center(10**10)``); compiled
    templates call filters directly, so the check has to sit in the filter."""
    @functools.wraps(fn)   # keeps Jinja's pass_context / pass_environment markers
    def wrapper(*args, **kwargs):
        _check_args(args, kwargs)
        return fn(*args, **kwargs)
    return wrapper


def _check_args(args, kwargs) -> None:
    for a in (*args, *kwargs.values()):
        if isinstance(a, int) and not isinstance(a, bool) and abs(a) > _MAX_INT_ARG:
            raise SecurityError(f"an argument of {a} is too large")


def _raise(message: str):
    raise ValueError(message)


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _rss_bytes() -> int:
    """The process's resident memory now (not its peak: a peak reached while the model
    loaded would hide any growth below it)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:   # not Linux: the peak is the best there is
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
