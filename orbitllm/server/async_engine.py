"""Drive one ``LLMEngine`` from a background thread for many asyncio requests.

``LLMEngine`` is not thread-safe, so only the engine thread touches it: asyncio
handlers send commands (add, abort) through a queue, and the thread applies them
between steps and hands each step's outputs back to the event loop in one batch.
Model compute releases the GIL, so the event loop keeps serving HTTP meanwhile.
A failure while adding or delivering one request fails that request only, and
``step()`` itself fails only the requests a failure is tied to (they end with
finish reason ``error``, delivered as ``RequestFailedError``). Should ``step()``
still raise, that is a bug in the engine: the requests in flight are failed and
the loop carries on with new ones.
"""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import queue
import threading
import time
from dataclasses import dataclass

from orbitllm.engine.llm_engine import LLMEngine
from orbitllm.engine.step_data import FatalStepError
from orbitllm.outputs import PoolingRequestOutput, PositionLogprobs, RequestOutput
from orbitllm.sampling_params import SamplingParams

log = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine loop has stopped; no request can be served."""


class EngineBusyError(RuntimeError):
    """Too many requests wait for the engine thread to take them in; retry later."""


class RequestTimeoutError(TimeoutError):
    """A request ran past its deadline and was aborted."""


@dataclass(frozen=True)
class EngineStats:
    """A consistent snapshot of engine counters, published after every loop turn."""

    num_running: int = 0
    num_waiting: int = 0
    kv_usage: float = 0.0
    prefix_queries: int = 0
    prefix_hits: int = 0
    num_preemptions: int = 0
    spec_num_drafts: int = 0            # speculative decoding: verify steps of a sequence
    spec_num_draft_tokens: int = 0
    spec_num_accepted_tokens: int = 0
    spec_accepted_per_pos: tuple[int, ...] = ()


@dataclass(frozen=True)
class ChoiceDelta:
    """What one choice gained since the last output: new text (only text that is safe to
    stream: a suffix that may still become a stop string is held back), new tokens and
    their logprobs, and how it ended once it has."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[PositionLogprobs] | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass(frozen=True)
class StreamedOutput:
    """One engine request's progress since its previous output: deltas, never copies of
    the whole sequence, so a backlog costs what is new. The first output also carries
    the prompt's facts."""

    choices: list[ChoiceDelta]
    finished: bool
    time: float
    first: bool = False
    prompt_token_ids: list[int] | None = None
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    num_cached_tokens: int = 0
    metrics: dict | None = None


class RequestFailedError(RuntimeError):
    """The engine could not compute this request (its step failed); others went on."""


class ClientTooSlowError(RuntimeError):
    """The client stopped reading its stream; the request was aborted to free its KV."""


@dataclass
class _ChoiceCursor:
    tokens: int = 0
    chars: int = 0
    finished: bool = False


class OutputBuffer:
    """The outputs of one API call's engine requests, in order, tagged with the prompt's
    index. Filled on the event loop (the engine thread hands outputs over with
    ``call_soon_threadsafe``), so the engine never waits on a reader; how the buffer
    stays bounded is the subclass's policy."""

    def __init__(self) -> None:
        self._items: collections.deque = collections.deque()   # [time, index, item]
        self._ready = asyncio.Event()

    def __len__(self) -> int:
        return len(self._items)

    def put(self, index: int, item: StreamedOutput | PoolingRequestOutput | BaseException) -> None:
        raise NotImplementedError

    def _append(self, index: int, item) -> list:
        entry = [time.monotonic(), index, item]
        self._items.append(entry)
        self._ready.set()
        return entry

    def _taken(self, entry: list) -> None:
        """The reader took ``entry``."""

    async def get(self, deadline: float | None, request_id: str) -> tuple[int, StreamedOutput]:
        while not self._items:
            self._ready.clear()
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                await asyncio.wait_for(self._ready.wait(), timeout)
            except asyncio.TimeoutError:
                raise RequestTimeoutError(f"request {request_id} timed out") from None
        entry = self._items.popleft()
        self._taken(entry)
        _, index, item = entry
        if isinstance(item, BaseException):
            raise item
        return index, item


class OutputQueue(OutputBuffer):
    """A stream's outputs, read as fast as its client reads. Bounded: when ``max_items``
    outputs wait, or the oldest has waited ``stall_s``, the reader is too slow and
    ``on_overflow`` aborts the call (its KV is freed); the reader then gets
    ``ClientTooSlowError``."""

    def __init__(self, max_items: int, stall_s: float, on_overflow) -> None:
        super().__init__()
        self.max_items = max_items
        self.stall_s = stall_s
        self.on_overflow = on_overflow
        self.overflowed = False

    def put(self, index: int, item: StreamedOutput | BaseException) -> None:
        if self.overflowed:
            return
        if isinstance(item, StreamedOutput) and self._items and (
                len(self._items) >= self.max_items
                or time.monotonic() - self._items[0][0] > self.stall_s):
            self.overflowed = True
            self._items.clear()
            self._append(index, ClientTooSlowError(
                f"the client read its stream too slowly ({self.max_items} outputs or "
                f"{self.stall_s:g} s behind); the request was aborted"))
            self.on_overflow()
            return
        self._append(index, item)


class CoalescingQueue(OutputBuffer):
    """The outputs of a call whose reader wants only the whole result (a plain response,
    beam search, embeddings). An output for a prompt whose previous output is still
    unread is merged into it, so however far the reader falls behind, at most one
    output per prompt waits (plus the errors, at most one per prompt and one shutdown)."""

    def __init__(self) -> None:
        super().__init__()
        self._unread: dict[int, list] = {}   # prompt index -> its waiting entry

    def put(self, index: int, item: StreamedOutput | PoolingRequestOutput | BaseException) -> None:
        entry = self._unread.get(index)
        if isinstance(item, StreamedOutput) and entry is not None:
            entry[2] = merged(entry[2], item)
            return
        entry = self._append(index, item)
        if isinstance(item, StreamedOutput):
            self._unread[index] = entry

    def _taken(self, entry: list) -> None:
        if self._unread.get(entry[1]) is entry:
            del self._unread[entry[1]]


def merged(a: StreamedOutput, b: StreamedOutput) -> StreamedOutput:
    """``a`` then ``b`` as one output: each choice's deltas joined, the prompt's facts
    and the time of ``a`` (when its tokens came), the end of ``b``."""
    choices = {c.index: c for c in a.choices}
    for c in b.choices:
        prev = choices.get(c.index)
        if prev is not None:
            lps = None if prev.logprobs is None and c.logprobs is None else (
                (prev.logprobs or []) + (c.logprobs or []))
            c = ChoiceDelta(c.index, prev.text + c.text, prev.token_ids + c.token_ids, lps,
                            c.finish_reason, c.stop_reason)
        choices[c.index] = c
    return dataclasses.replace(a, choices=sorted(choices.values(), key=lambda c: c.index),
                               finished=b.finished)


class RequestStream:
    """The asyncio side of one engine request; its outputs go to its call's queue."""

    def __init__(self, request_id: str, index: int, sink: OutputBuffer, n: int) -> None:
        self.request_id = request_id
        self.index = index
        self.sink = sink
        self.started = False        # left the waiting count (first output, error or abort)
        self.finished = False       # the engine finished it (not an error or a timeout)
        self.aborted = False
        self.cursors = [_ChoiceCursor() for _ in range(n)]   # engine thread only
        self.sent_first = False                               # engine thread only

    def put(self, item: StreamedOutput | PoolingRequestOutput | BaseException) -> None:
        if isinstance(item, (StreamedOutput, PoolingRequestOutput)) and item.finished:
            self.finished = True
        self.sink.put(self.index, item)


@dataclass
class _Add:
    stream: RequestStream
    prompt: object
    params: SamplingParams
    priority: int
    cache_salt: str | None
    accepted: asyncio.Future
    keep_blocks: bool = False        # beam search: the blocks outlive the request ...
    fork_from: str | None = None     # ... and a later beam's request shares them
    pooling: str | None = None       # an embedding request ("last" / "mean")


@dataclass
class _Abort:
    request_id: str


@dataclass
class _Release:
    request_id: str


class _Stop:
    pass


class AsyncEngine:
    """Owns the engine thread. Call ``start()`` inside the running event loop.

    The command queue is bounded without ever making either side wait: at most
    ``max_pending_adds`` adds wait for the engine thread (the thread takes every command
    between steps, so only a long step lets them pile up); one more is refused at once
    with ``EngineBusyError``. Aborts and releases are never refused (a lost abort would
    leak KV): each request sends at most one of each, so they are bounded by the
    requests admitted."""

    def __init__(self, engine: LLMEngine, idle_wait_s: float = 0.5,
                 max_pending_adds: int = 1024) -> None:
        self.engine = engine
        self.stats = EngineStats()
        self._idle_wait_s = idle_wait_s
        self.max_pending_adds = max_pending_adds
        self._pending_adds = 0                           # event loop's view: queued, not taken
        self._commands: queue.Queue = queue.Queue()
        self._streams: dict[str, RequestStream] = {}     # engine thread's view
        self._num_waiting = 0                            # event loop's view: added, no output yet
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    # ---- event loop side ----------------------------------------------------------
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="orbitllm-engine", daemon=True)
        self._thread.start()

    @property
    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def num_waiting(self) -> int:
        """Requests accepted that have not produced output yet (queued or prefilling)."""
        return self._num_waiting

    async def add(self, stream: RequestStream, prompt, params: SamplingParams, priority: int = 0,
                  cache_salt: str | None = None, keep_blocks: bool = False,
                  fork_from: str | None = None, pooling: str | None = None) -> RequestStream:
        """Queue a request; returns once the engine accepted it (ValueError if it did not).
        ``keep_blocks`` / ``fork_from``: see ``LLMEngine.add_request``; ``release``
        frees kept blocks. ``pooling``: an embedding request, whose one output is a
        ``PoolingRequestOutput``."""
        if not self.is_alive:
            raise EngineDeadError("the engine loop is not running")
        if self._pending_adds >= self.max_pending_adds:
            raise EngineBusyError(f"{self._pending_adds} requests already wait for the engine "
                                  "to take them in; retry later")
        accepted = self._loop.create_future()
        self._pending_adds += 1
        accepted.add_done_callback(self._taken_in)
        self._num_waiting += 1
        self._commands.put(_Add(stream, prompt, params, priority, cache_salt, accepted,
                                keep_blocks, fork_from, pooling))
        try:
            # shielded: a caller that gives up must not settle the future before the
            # engine thread has taken the command, or the pending count would undercount
            await asyncio.shield(accepted)
        except BaseException:
            self.abort(stream)
            raise
        return stream

    def release(self, request_id: str) -> None:
        """Free the blocks a finished ``keep_blocks`` request still holds."""
        self._commands.put(_Release(request_id))

    def _taken_in(self, accepted: asyncio.Future) -> None:
        self._pending_adds -= 1
        if not accepted.cancelled():
            accepted.exception()   # read: a caller that gave up no longer awaits it

    def abort(self, stream: RequestStream) -> None:
        """Stop a request and free its KV blocks at the engine's next turn (once)."""
        if stream.aborted:
            return
        self._forget(stream)
        stream.aborted = True
        self._commands.put(_Abort(stream.request_id))

    async def stop(self) -> None:
        """Abort what is left, fail its streams and join the thread."""
        if self._thread is None:
            return
        self._commands.put(_Stop())
        await asyncio.to_thread(self._thread.join)

    def _deliver(self, batch: list[tuple[RequestStream, StreamedOutput | BaseException]]) -> None:
        for stream, item in batch:
            self._forget(stream)
            stream.put(item)

    def _forget(self, stream: RequestStream) -> None:
        """Leave the waiting count once: at first output, on error or on abort."""
        if not stream.started:
            stream.started = True
            self._num_waiting -= 1

    # ---- engine thread ------------------------------------------------------------
    def _run(self) -> None:
        error: BaseException = EngineDeadError("the server is shutting down")
        try:
            while True:
                idle = not self.engine.has_unfinished_requests()
                if not self._apply_commands(block=idle):
                    break
                if self.engine.has_unfinished_requests():
                    self._step()
                self.stats = self._read_stats()
        except Exception as e:   # a bug in the loop itself: fail everyone, then stop
            log.exception("engine loop crashed")
            error = e
        finally:
            self._fail_all(error)
            self._refuse_queued(error)
            self.stats = self._read_stats()

    def _refuse_queued(self, error: BaseException) -> None:
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return
            if isinstance(cmd, _Add):
                self._call_soon(_settle, cmd.accepted, error)

    def _apply_commands(self, block: bool) -> bool:
        """Apply queued commands; False once asked to stop."""
        try:
            cmd = self._commands.get(timeout=self._idle_wait_s) if block else self._commands.get_nowait()
        except queue.Empty:
            return True
        while True:
            if isinstance(cmd, _Stop):
                return False
            if isinstance(cmd, _Add):
                self._add(cmd)
            elif isinstance(cmd, _Release):
                self.engine.release_blocks(cmd.request_id)
            else:
                self._abort(cmd.request_id)
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return True

    def _add(self, cmd: _Add) -> None:
        rid = cmd.stream.request_id
        try:
            if cmd.pooling is not None:
                self.engine.add_pooling_request(rid, cmd.prompt, cmd.pooling)
            else:
                self.engine.add_request(rid, cmd.prompt, cmd.params, priority=cmd.priority,
                                        cache_salt=cmd.cache_salt, keep_blocks=cmd.keep_blocks,
                                        fork_from=cmd.fork_from)
        except Exception as e:
            if not isinstance(e, ValueError):   # a ValueError is the client's mistake
                log.exception("adding request %s failed", rid)
            self._call_soon(_settle, cmd.accepted, e)
            return
        self._streams[rid] = cmd.stream
        self._call_soon(_settle, cmd.accepted, None)

    def _abort(self, request_id: str) -> None:
        self._streams.pop(request_id, None)
        try:
            self.engine.abort_request(request_id)
        except Exception:
            log.exception("abort of %s failed", request_id)

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except FatalStepError:
            raise   # the loop ends: /health turns 503 and new requests are refused
        except Exception:   # the engine isolates request faults; this is a bug in it
            log.exception("engine step failed; failing the %d requests in flight", len(self._streams))
            self._fail_all(RequestFailedError("the engine step failed"))
            return
        now = time.monotonic()
        batch = []
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            try:
                item = self._pooled(out) if isinstance(out, PoolingRequestOutput) else self._delta(
                    stream, out, now)
            except Exception as e:
                log.exception("output of %s failed", out.request_id)
                self._abort(out.request_id)
                item = e
            if item is None:
                continue
            if isinstance(item, BaseException) or out.finished:
                self._streams.pop(out.request_id, None)
            batch.append((stream, item))
        if batch:
            self._call_soon(self._deliver, batch)

    def _delta(self, stream: RequestStream, out: RequestOutput,
               now: float) -> StreamedOutput | BaseException | None:
        """What is new in ``out`` for ``stream`` (None: nothing)."""
        if any(c.finish_reason == "error" for c in out.outputs):
            return RequestFailedError(f"the engine could not compute request {out.request_id}")
        texts = self._stream_texts(out)
        choices = []
        for i, c in enumerate(out.outputs):
            cur = stream.cursors[i]
            if cur.finished:
                continue
            done = c.finish_reason is not None
            text = texts[i][cur.chars:]
            if not text and len(c.token_ids) == cur.tokens and not done:
                continue
            lps = None if c.logprobs is None else c.logprobs[cur.tokens:len(c.token_ids)]
            choices.append(ChoiceDelta(i, text, c.token_ids[cur.tokens:], lps,
                                       c.finish_reason, c.stop_reason))
            cur.chars, cur.tokens, cur.finished = max(cur.chars, len(texts[i])), len(c.token_ids), done
        if not choices and not out.finished:
            return None
        first = not stream.sent_first
        stream.sent_first = True
        if not first:
            return StreamedOutput(choices, out.finished, now)
        prompt_lps = None if out.prompt_logprobs is None else list(out.prompt_logprobs)
        return StreamedOutput(choices, out.finished, now, True, list(out.prompt_token_ids),
                              prompt_lps, out.num_cached_tokens, dict(out.metrics))

    @staticmethod
    def _pooled(out: PoolingRequestOutput) -> PoolingRequestOutput | BaseException:
        if out.finish_reason == "error":
            return RequestFailedError(f"the engine could not compute request {out.request_id}")
        return out

    def _stream_texts(self, out: RequestOutput) -> list[str]:
        detoks = self.engine.detokenizers(out.request_id)
        if not detoks:   # the group just finished: every text is final
            return [c.text for c in out.outputs]
        return [d.stream_text(c.finish_reason is not None) for d, c in zip(detoks, out.outputs)]

    def _fail_all(self, error: BaseException) -> None:
        batch = []
        for rid, stream in list(self._streams.items()):
            self._abort(rid)
            batch.append((stream, error))
        if batch:
            self._call_soon(self._deliver, batch)

    def _read_stats(self) -> EngineStats:
        e = self.engine
        return EngineStats(num_running=e.scheduler.num_running, num_waiting=e.scheduler.num_waiting,
                           kv_usage=e.kv_usage(), prefix_queries=e.kv.prefix_queries,
                           prefix_hits=e.kv.prefix_hits, num_preemptions=e.scheduler.num_preemptions,
                           spec_num_drafts=e.spec_stats.num_drafts,
                           spec_num_draft_tokens=e.spec_stats.num_draft_tokens,
                           spec_num_accepted_tokens=e.spec_stats.num_accepted_tokens,
                           spec_accepted_per_pos=tuple(e.spec_stats.accepted_per_pos))

    def _call_soon(self, fn, *args) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:   # the event loop is closed: nobody is listening any more
            pass


def _settle(future: asyncio.Future, error: BaseException | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)
