"""The HTTP server: a FastAPI app over one ``AsyncEngine``, run by uvicorn.

Everything a running server holds (engine, settings, metrics) hangs off
``app.state``; nothing is module-global, so a process can host several apps.
"""
from __future__ import annotations

import asyncio
import json
import logging
import secrets
import signal
import time
from contextlib import asynccontextmanager
from typing import Callable

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

import orbitllm
from orbitllm.engine.llm_engine import LLMEngine
from orbitllm.server.async_engine import AsyncEngine
from orbitllm.server.limits import BodySizeLimitMiddleware, IdleTimeoutH11Protocol
from orbitllm.server.metrics import ServerMetrics
from orbitllm.server.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                                      EmbeddingRequest, ModelCard, ModelList, TokenizeRequest)
from orbitllm.server.serving import LOG_SCOPE_KEY, APIError, OpenAIServing, ServerSettings

access_log = logging.getLogger("orbitllm.access")
log = logging.getLogger(__name__)


class AccessLogMiddleware:
    """One JSON line per HTTP request, written when the response (or stream) has ended.
    Handlers add fields (id, tokens, TTFT) under ``scope[LOG_SCOPE_KEY]``."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.monotonic()
        fields: dict = {}
        scope[LOG_SCOPE_KEY] = fields
        status = [499]   # the client left before a response started

        async def send_and_note(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        except Exception:
            status[0] = 500
            raise
        finally:
            client = scope.get("client")
            record = {"ts": round(time.time(), 3), "method": scope["method"], "path": scope["path"],
                      "status": status[0], "latency_s": round(time.monotonic() - start, 4),
                      "client": client[0] if client else None, **fields}
            access_log.info(json.dumps(record, ensure_ascii=False, default=str))


def _require_api_key(request: Request) -> None:
    expected = request.app.state.settings.api_key
    if expected is None:
        return
    given = request.headers.get("authorization", "")
    scheme, _, token = given.partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), expected.encode()):
        raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer KEY')",
                       type="authentication_error", code="invalid_api_key")


def _validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    # A check of ours (a value error) says more than a union's other branches' type errors.
    first = next((e for e in errors if e.get("type") == "value_error"), errors[0] if errors else {})
    if first.get("type") == "json_invalid":
        return APIError(400, f"malformed JSON body: {first.get('ctx', {}).get('error', first.get('msg'))}")
    # Drop "body" and pydantic's union-member tags ("str", "list[int]") from the location.
    loc = [str(p) for p in first.get("loc", ()) if p != "body" and not _is_type_tag(p)]
    param = loc[0] if loc else None
    where = ".".join(loc) if loc else "body"
    return APIError(400, f"{where}: {first.get('msg', 'invalid request')}", param=param)


def _is_type_tag(part) -> bool:
    return isinstance(part, str) and (part in {"str", "int", "float", "bool", "list", "dict"}
                                      or "[" in part)


def _reply(request: Request, error: APIError) -> Response:
    """The error body, noted for the access log."""
    request.scope.setdefault(LOG_SCOPE_KEY, {}).update(error=error.info.message,
                                                       error_type=error.info.type)
    return error.response()


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> Response:
        return _reply(request, exc)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError) -> Response:
        return _reply(request, _validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _reply(request, APIError(exc.status_code, str(exc.detail), type=kind))

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error")
        return _reply(request, APIError.from_exception(exc))


def _install_routes(app: FastAPI) -> None:
    v1 = [Depends(_require_api_key)]

    @app.post("/v1/completions", dependencies=v1)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await request.app.state.serving.completion(body, request)

    @app.post("/v1/chat/completions", dependencies=v1)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await request.app.state.serving.chat(body, request)

    @app.post("/v1/embeddings", dependencies=v1)
    async def embeddings(body: EmbeddingRequest, request: Request) -> Response:
        return await request.app.state.serving.embeddings(body, request)

    @app.get("/v1/models", dependencies=v1)
    async def models(request: Request) -> dict:
        settings: ServerSettings = request.app.state.settings
        max_len = request.app.state.engine.engine.max_model_len
        # root names the model as clients know it: never a path on the server's disk.
        return ModelList(data=[ModelCard(id=name, root=settings.served_model_names[0],
                                         max_model_len=max_len)
                               for name in settings.served_model_names]).model_dump()

    @app.post("/tokenize", dependencies=v1)
    async def tokenize(body: TokenizeRequest, request: Request) -> dict:
        return await request.app.state.serving.tokenize(body)

    @app.post("/detokenize", dependencies=v1)
    async def detokenize(body: DetokenizeRequest, request: Request) -> dict:
        return await request.app.state.serving.detokenize(body)

    @app.get("/health")
    async def health(request: Request) -> Response:
        """Liveness: the process answers and its engine loop has not died."""
        return Response(status_code=200 if request.app.state.engine.is_alive else 503)

    @app.get("/ready")
    async def ready(request: Request) -> Response:
        """Readiness: the model is loaded and new requests are accepted (not while the
        server drains for shutdown), so a load balancer sends traffic elsewhere then."""
        ok = request.app.state.engine.is_alive and not request.app.state.serving.draining
        return Response(status_code=200 if ok else 503)

    @app.get("/version")
    async def version() -> dict:
        return {"version": orbitllm.__version__}

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        body = request.app.state.metrics.render(request.app.state.engine.stats)
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")


def build_app(engine: LLMEngine, settings: ServerSettings) -> FastAPI:
    """The app; the engine thread starts with the app's lifespan and stops with it."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.engine.start()
        try:
            yield
        finally:
            app.state.serving.cut_all()
            await app.state.engine.stop()
            app.state.serving.preprocessor.shutdown()

    app = FastAPI(title="orbitllm", version=orbitllm.__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None)
    async_engine = AsyncEngine(engine)
    app.state.engine = async_engine
    app.state.settings = settings
    app.state.metrics = ServerMetrics(settings.served_model_names[0])
    app.state.serving = OpenAIServing(async_engine, settings, app.state.metrics)
    _install_error_handlers(app)
    _install_routes(app)
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_request_bytes)
    app.add_middleware(AccessLogMiddleware)
    return app


# After the shutdown deadline cut the requests left, this long lets their last
# error events and 503 bodies reach the clients before uvicorn closes the sockets.
_CUT_GRACE_S = 2.0
_DRAIN_POLL_S = 0.05


class _Drain:
    """SIGTERM/SIGINT start a drain: the server keeps listening, so load balancers see
    ``/ready`` answer 503 (``/health`` stays 200) and new requests get 503, while the
    requests in flight finish. Once none is left, or ``timeout_s`` has passed (the rest
    are then cut with an error their clients see), ``stop`` shuts uvicorn down. A
    second signal stops at once."""

    def __init__(self, serving, timeout_s: float, in_flight: Callable[[], int],
                 stop: Callable[[int], None]) -> None:
        self.serving = serving
        self.timeout_s = timeout_s
        self.in_flight = in_flight   # HTTP requests running
        self.stop = stop             # uvicorn's own exit, given the signal
        self._signal = signal.SIGTERM

    def begin(self, sig: int) -> None:
        """From the signal handler: the rest happens on the event loop."""
        if self.serving.draining:
            self.stop(sig)
            return
        self._signal = sig
        self.serving.draining = True
        loop = asyncio.get_event_loop()
        loop.call_soon_threadsafe(loop.create_task, self._wait_then_stop())

    async def _wait_then_stop(self) -> None:
        deadline = time.monotonic() + self.timeout_s
        while self.in_flight() and time.monotonic() < deadline:
            await asyncio.sleep(_DRAIN_POLL_S)
        if self.in_flight():
            self.serving.cut_all()
        self.stop(self._signal)


def run_server(engine: LLMEngine, settings: ServerSettings, host: str, port: int,
               shutdown_timeout: float = 30.0, log_level: str = "info") -> None:
    """Serve until SIGTERM/SIGINT, then drain (see ``_Drain``): in-flight requests get up
    to ``shutdown_timeout`` seconds, the rest end with an error their clients see (an
    error event and ``[DONE]`` for a stream, a 503 otherwise); return normally."""
    import uvicorn

    app = build_app(engine, settings)

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            drain.begin(sig)

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                            timeout_graceful_shutdown=_CUT_GRACE_S, lifespan="on",
                            http=IdleTimeoutH11Protocol,
                            timeout_keep_alive=settings.idle_connection_timeout)
    server = DrainingServer(config)
    drain = _Drain(app.state.serving, shutdown_timeout,
                   in_flight=lambda: len(server.server_state.tasks),
                   stop=lambda sig: uvicorn.Server.handle_exit(server, sig, None))
    # uvicorn re-raises the signal it handled once it has shut down; a graceful
    # shutdown is a normal exit, so that re-raised signal must not kill us.
    handled = (signal.SIGTERM, signal.SIGINT)
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in handled}
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
