"""``orbitllm bench``: a parent command over the benchmark modules listed below.

A benchmark module provides ``add_args(parser)`` and ``main(args)``, or, when it
builds an engine (``engine=True``), ``main(args, engine_config)`` and gets every
engine flag. A listed module that is not there is skipped, so adding a benchmark
is one line.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Benchmark:
    name: str
    module: str
    help: str
    engine: bool = False


BENCHMARKS = [
    Benchmark("serve", "orbitllm.bench.serve", "load a running OpenAI-compatible server"),
    Benchmark("throughput", "orbitllm.bench.throughput", "offline engine throughput", engine=True),
]


def register(subparsers, add_engine_args, engine_config_from_args) -> None:
    parser = subparsers.add_parser("bench", help="benchmark a server or the engine")
    benchmarks = parser.add_subparsers(dest="benchmark", metavar="BENCHMARK")
    for bench in BENCHMARKS:
        try:
            mod = importlib.import_module(bench.module)
        except ModuleNotFoundError as e:
            if e.name != bench.module:
                raise
            continue
        sub = benchmarks.add_parser(bench.name, help=bench.help, description=mod.__doc__)
        mod.add_args(sub)
        if bench.engine:
            add_engine_args(sub, model_positional=True)
            sub.set_defaults(func=lambda args, m=mod: m.main(args, engine_config_from_args(args)))
        else:
            sub.set_defaults(func=mod.main)
    parser.set_defaults(func=lambda _args: parser.print_help() or 0)
