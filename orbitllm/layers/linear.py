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


def gemv_enabled() -> bool:
    """Whether one-row products of 16-bit weights on a GPU take the Triton GEMV."""
    return _triton_gemv() is not None


def takes_gemv(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``linear`` computes this product with the Triton GEMV."""
    return (x.is_cuda and x.shape[0] == 1 and weight.dtype in (torch.bfloat16, torch.float16)
            and gemv_enabled())


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           out: torch.Tensor | None = None, send=None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, written into ``out`` when given (no bias then).
    ``send`` (a ``kernels.gemv.PeerSend``, only where ``takes_gemv``): the GEMV also
    sends its output to the tensor-parallel peers."""
    if takes_gemv(x, weight):
        return _triton_gemv()(x, weight, bias, out, send=send)
    assert send is None, "only the Triton GEMV sends to peers"
    if out is None:
        return F.linear(x, weight, bias)
    assert bias is None
    return torch.mm(x, weight.t(), out=out)
