"""``orbitllm serve``: its flags, and starting the server from them.

Imported whenever the ``orbitllm`` command builds its parser, so the server's
dependencies are imported only when ``serve`` actually runs.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path


def register(subparsers, add_engine_args, engine_config_from_args) -> None:
    parser = subparsers.add_parser(
        "serve", help="run the OpenAI-compatible HTTP server",
        description="Serve a model over the OpenAI API (/v1/completions, /v1/chat/completions, ...).")
    add_engine_args(parser, model_positional=True)
    group = parser.add_argument_group("server")
    group.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    group.add_argument("--port", type=int, default=8000)
    group.add_argument("--api-key", default=os.environ.get("ORBITLLM_API_KEY"),
                       help="require 'Authorization: Bearer KEY' on /v1 routes "
                            "(default: env ORBITLLM_API_KEY)")
    group.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                       help="model name(s) clients use (default: the MODEL argument)")
    group.add_argument("--max-num-waiting", type=int, default=None, metavar="N",
                       help="answer 429 while N requests wait for their first token")
    group.add_argument("--request-timeout", type=float, default=None, metavar="SECONDS",
                       help="abort a request that runs longer than this (408)")
    group.add_argument("--shutdown-timeout", type=float, default=30.0, metavar="SECONDS",
                       help="on SIGTERM, how long in-flight requests may take to finish")
    group.add_argument("--max-request-bytes", type=int, default=4 << 20, metavar="BYTES",
                       help="refuse request bodies larger than this with 413 (default: 4 MiB)")
    group.add_argument("--preprocess-timeout", type=float, default=10.0, metavar="SECONDS",
                       help="time limit to tokenize a request / render its chat template (408)")
    group.add_argument("--trust-request-chat-template", action="store_true",
                       help="run chat templates that requests send (sandboxed, with limits); "
                            "off: such requests get 400")
    group.add_argument("--max-stream-buffer", type=int, default=1024, metavar="N",
                       help="abort a stream whose client leaves N outputs unread")
    group.add_argument("--stream-stall-timeout", type=float, default=60.0, metavar="SECONDS",
                       help="abort a stream whose oldest unread output is this old")
    group.add_argument("--idle-connection-timeout", type=float, default=5.0, metavar="SECONDS",
                       help="close a connection that sends no request for this long")
    group.add_argument("--pooling", choices=["last", "mean"], default="last",
                       help="/v1/embeddings: the final hidden state of the last token, or the "
                            "mean over the input's tokens (default: last)")
    group.add_argument("--tool-call-parser", default=None, choices=["hermes", "llama3_json"],
                       help="how tool calls are read from the model's text when tool_choice is "
                            "'auto' (default: detected from the chat template)")
    group.add_argument("--log-prompts", action="store_true",
                       help="include prompt text in the access log (off: privacy)")
    group.add_argument("--log-level", default="info",
                       choices=["critical", "error", "warning", "info", "debug"])
    parser.set_defaults(func=lambda args: _serve(args, engine_config_from_args))


def _serve(args: argparse.Namespace, engine_config_from_args) -> int:
    if args.max_num_waiting is not None and args.max_num_waiting < 0:
        raise ValueError(f"--max-num-waiting must be >= 0, got {args.max_num_waiting}")
    if args.request_timeout is not None and args.request_timeout <= 0:
        raise ValueError(f"--request-timeout must be > 0, got {args.request_timeout}")
    if args.api_key is not None and not args.api_key.strip():
        raise ValueError("--api-key (or ORBITLLM_API_KEY) is empty, which would turn "
                         "authentication off; leave it unset to serve without a key")
    for flag in ("max_request_bytes", "max_stream_buffer"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    for flag in ("preprocess_timeout", "stream_stall_timeout", "idle_connection_timeout"):
        if getattr(args, flag) <= 0:
            raise ValueError(f"--{flag.replace('_', '-')} must be > 0, got {getattr(args, flag)}")
    from orbitllm.deps import SERVER_PACKAGES, require
    require(SERVER_PACKAGES, "orbitllm serve")   # before the model loads, not after
    from orbitllm.engine.llm_engine import LLMEngine
    from orbitllm.server.api_server import run_server
    from orbitllm.server.serving import ServerSettings

    _configure_logging(args.log_level)
    config = engine_config_from_args(args)
    engine = LLMEngine(config)
    settings = ServerSettings(
        served_model_names=args.served_model_name or [served_name(config.model)],
        model_aliases=[config.model] if config.model and not args.served_model_name else [],
        api_key=args.api_key, max_num_waiting=args.max_num_waiting,
        request_timeout=args.request_timeout, log_prompts=args.log_prompts,
        max_request_bytes=args.max_request_bytes, preprocess_timeout=args.preprocess_timeout,
        trust_request_chat_template=args.trust_request_chat_template,
        max_stream_buffer=args.max_stream_buffer, stream_stall_timeout=args.stream_stall_timeout,
        idle_connection_timeout=args.idle_connection_timeout, pooling=args.pooling,
        tool_call_parser=args.tool_call_parser)
    run_server(engine, settings, args.host, args.port, args.shutdown_timeout, args.log_level)
    return 0


def served_name(model: str | None) -> str:
    """The name clients use by default: the model's, never a path on this disk
    (``/srv/models/Qwen3-8B`` is served as ``Qwen3-8B``; a hub id as itself)."""
    if model is None:
        from orbitllm.models.default_model import DEFAULT_MODEL_NAME
        return DEFAULT_MODEL_NAME.split(" ")[0]
    path = Path(model)
    if path.exists():
        return path.stem if path.is_file() else path.resolve().name
    return model


def _configure_logging(level: str) -> None:
    """Access lines are bare JSON on stderr; everything else gets a plain prefix."""
    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    access = logging.getLogger("orbitllm.access")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    access.addHandler(handler)
    access.setLevel(logging.INFO)
    access.propagate = False
