"""The kernel of a 16-bit (or float32) product ``x @ weight.T (+ bias)``: the Triton decode
GEMV for one-row steps (single-request decode) of 16-bit weights on a GPU, cuBLAS for
everything else. The linear layers' unquantized method and the LM head call it.

``ORBITLLM_GEMV=cublas`` (``orbitllm/envs.py``) sends the one-row steps to cuBLAS too.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from orbitllm.envs import envs


@functools.cache
def _triton_gemv():
    if envs().gemv == "cublas":
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
    """Whether ``matmul`` computes this product with the Triton GEMV."""
    return (x.is_cuda and x.shape[0] == 1 and weight.dtype in (torch.bfloat16, torch.float16)
            and gemv_enabled())


def matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           out: torch.Tensor | None = None, send=None, silu_mul: bool = False) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, written into ``out`` when given (no bias then).
    Only where ``takes_gemv``: ``send`` (a ``kernels.gemv.PeerSend``), the GEMV also
    sends its output to the tensor-parallel peers; ``silu_mul``, ``x`` is an MLP's
    ``[gate | up]`` and the product takes ``silu(gate) * up``."""
    if takes_gemv(x, weight):
        return _triton_gemv()(x, weight, bias, out, send=send, silu_mul=silu_mul)
    assert send is None and not silu_mul, "only the Triton GEMV sends to peers or fuses SiLU"
    if out is None:
        return F.linear(x, weight, bias)
    assert bias is None
    return torch.mm(x, weight.t(), out=out)
