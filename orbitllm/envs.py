"""orbitllm's environment variables, read in one place and once per process.

Each is an A/B switch for benchmarks or a user setting that has no engine option; the
hot path reads the frozen ``Envs`` that ``envs()`` returns, never ``os.environ``.
Tensor-parallel worker processes are spawned, so they read the variables afresh.
(torchrun's ``RANK``/``LOCAL_RANK``/... and the server's ``ORBITLLM_API_KEY`` default
are read where they are used: they describe the launch, not the engine.)
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping


@dataclass(frozen=True)
class Envs:
    # ORBITLLM_GEMV=cublas: one-row steps take cuBLAS too, not the Triton decode GEMV.
    gemv: str
    # ORBITLLM_PDL=0: no programmatic dependent launch on Hopper.
    pdl: bool
    # TRITON_INTERPRET=1 (Triton's own): the interpreter has no PDL.
    triton_interpret: bool
    # ORBITLLM_CACHE_DIR, else $XDG_CACHE_HOME/orbitllm, else ~/.cache/orbitllm: the GGUF
    # weight and tokenizer cache.
    cache_dir: Path

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> "Envs":
        gemv = environ.get("ORBITLLM_GEMV", "triton")
        if gemv not in ("triton", "cublas"):
            raise ValueError(f"ORBITLLM_GEMV must be triton or cublas, got {gemv!r}")
        if override := environ.get("ORBITLLM_CACHE_DIR"):
            cache_dir = Path(override).expanduser()
        else:
            xdg = environ.get("XDG_CACHE_HOME")
            cache_dir = (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "orbitllm"
        return cls(gemv=gemv, pdl=environ.get("ORBITLLM_PDL", "1") != "0",
                   triton_interpret=environ.get("TRITON_INTERPRET") == "1", cache_dir=cache_dir)


@functools.cache
def envs() -> Envs:
    """This process's variables, read on first use (tests that change one call
    ``envs.cache_clear()``)."""
    return Envs.from_environ(os.environ)
