"""``x @ weight.T (+ bias)`` for the model's projections: the Triton GEMV for one-row
steps (single-request decode) of 16-bit weights on a GPU, cuBLAS for everything else.

``ORBITLLM_GEMV=cublas`` sends the one-row steps to cuBLAS too (an A/B switch for
benchmarks; it is read once per process). ``ORBITLLM_ROPE_GEMV=1`` lets one-row decode
steps rotate q/k and write the KV cache in the QKV projection's GEMV (``RopeWrite``);
off by default until measured on a GPU.
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


@functools.cache
def rope_in_gemv() -> bool:
    """Whether one-row decode steps rotate and write K/V in the QKV GEMV (opt-in)."""
    return os.environ.get("ORBITLLM_ROPE_GEMV", "0") == "1" and gemv_enabled()


def takes_gemv(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``linear`` computes this product with the Triton GEMV."""
    return (x.is_cuda and x.shape[0] == 1 and weight.dtype in (torch.bfloat16, torch.float16)
            and gemv_enabled())


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           out: torch.Tensor | None = None, send=None, silu_mul: bool = False,
           rope=None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, written into ``out`` when given (no bias then).
    Only where ``takes_gemv``: ``send`` (a ``kernels.gemv.PeerSend``), the GEMV also
    sends its output to the tensor-parallel peers; ``silu_mul``, ``x`` is an MLP's
    ``[gate | up]`` and the product takes ``silu(gate) * up``; ``rope`` (a
    ``kernels.gemv.RopeWrite``), the QKV GEMV rotates and writes the KV cache."""
    if takes_gemv(x, weight):
        return _triton_gemv()(x, weight, bias, out, send=send, silu_mul=silu_mul, rope=rope)
    assert send is None and not silu_mul and rope is None, \
        "only the Triton GEMV sends to peers, fuses SiLU or writes the KV cache"
    if out is None:
        return F.linear(x, weight, bias)
    assert bias is None
    return torch.mm(x, weight.t(), out=out)
