"""``orbitllm bench``: a parent command over the benchmark modules listed below.

Each module provides ``register(subparsers, add_engine_args, engine_config_from_args)``,
the same contract as the top-level commands, and adds its own sub-command. A
listed module that is not there is skipped, so adding a benchmark is one line.
"""
from __future__ import annotations

import importlib

BENCHMARKS = [
    "orbitllm.bench.serve",
    "orbitllm.bench.throughput",
]


def register(subparsers, add_engine_args, engine_config_from_args) -> None:
    parser = subparsers.add_parser("bench", help="benchmark a server or the engine")
    benchmarks = parser.add_subparsers(dest="benchmark", metavar="BENCHMARK")
    for module in BENCHMARKS:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
            continue
        mod.register(benchmarks, add_engine_args, engine_config_from_args)
    parser.set_defaults(func=lambda _args: parser.print_help() or 0)
