"""``x @ weight.T (+ bias)`` for the model's projections: the Triton GEMV for one-row
steps (single-request decode) of 16-bit weights on a GPU, cuBLAS for everything else.

``ORBITLLM_GEMV=cublas`` sends the one-row steps to cuBLAS too (an A/B switch for
benchmarks; it is read once per process).
"""
from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F


@functools.cache
def _triton_gemv():
    if os.environ.get("ORBITLLM_GEMV", "triton") == "cublas":
        return None
    try:
        from orbitllm.kernels.gemv import gemv
    except ImportError:   # no triton
        return None
    return gemv


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, written into ``out`` when given (no bias then)."""
    if x.is_cuda and x.shape[0] == 1 and weight.dtype in (torch.bfloat16, torch.float16):
        gemv = _triton_gemv()
        if gemv is not None:
            return gemv(x, weight, bias, out)
    if out is None:
        return F.linear(x, weight, bias)
    assert bias is None
    return torch.mm(x, weight.t(), out=out)
