"""Benchmarks (``orbitllm bench ...``). Each benchmark is a module with a
``register`` function; see ``orbitllm.bench.cli``."""
