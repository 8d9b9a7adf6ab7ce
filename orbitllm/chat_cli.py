"""``orbitllm chat``: a terminal chat that streams tokens and keeps the conversation."""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import sys

from orbitllm.sampling_params import SamplingParams


def register(sub, add_engine_args, engine_config_from_args) -> None:
    p = sub.add_parser("chat", help="chat in the terminal (default model; Ctrl-D exits)")
    add_engine_args(p)
    p.add_argument("--message", default=None, help="answer this one message and exit")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--temperature", type=float, default=0.7, help="0: greedy and deterministic")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-tokens", type=int, default=256)
    p.set_defaults(func=lambda args: run_chat(args, engine_config_from_args(args)))


def stream_reply(llm, messages: list[dict], params: SamplingParams, out=sys.stdout) -> str:
    """Generate one assistant turn, writing text to ``out`` as it is produced."""
    engine = llm.engine
    ids = llm.apply_chat_template(messages)
    request_id = f"chat-{next(_ids)}"
    engine.add_request(request_id, {"prompt_token_ids": ids}, params)
    shown = ""
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.request_id != request_id:
                continue
            text = o.outputs[0].text
            out.write(text[len(shown):])
            out.flush()
            shown = text
    out.write("\n")
    out.flush()
    return shown


_ids = itertools.count()


def run_chat(args: argparse.Namespace, config) -> int:
    from orbitllm import LLM
    llm = LLM(**dataclasses.asdict(config))
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p,
                            max_tokens=args.max_tokens, seed=config.seed)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    if args.message is not None:
        stream_reply(llm, messages + [{"role": "user", "content": args.message}], params)
        return 0
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print(">>> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:   # Ctrl-D / end of input
            if interactive:
                print()
            return 0
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line.rstrip("\n")})
        reply = stream_reply(llm, messages, params)
        messages.append({"role": "assistant", "content": reply})
