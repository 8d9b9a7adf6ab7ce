"""``x @ weight.T (+ bias)`` for the model's projections: the Triton GEMV for one-row
steps (single-request decode) of 16-bit weights on a GPU, cuBLAS for everything else.
``linear_silu_mul`` does the MLP's gate/up projection with its activation.

``ORBITLLM_GEMV=cublas`` sends the one-row steps to cuBLAS too (an A/B switch for
benchmarks; it is read once per process).
"""
from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

from orbitllm.layers.fused import fused_ops_for


@functools.cache
def _triton_gemv():
    if os.environ.get("ORBITLLM_GEMV", "triton") == "cublas":
        return None
    try:
        from orbitllm.kernels.gemv import gemv
    except ImportError:   # no triton
        return None
    return gemv


def _gemv_for(x: torch.Tensor, weight: torch.Tensor):
    """The Triton GEMV when it takes this product (one row, 16-bit weights, GPU), else None."""
    if x.is_cuda and x.shape[0] == 1 and weight.dtype in (torch.bfloat16, torch.float16):
        return _triton_gemv()
    return None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, written into ``out`` when given (no bias then)."""
    gemv = _gemv_for(x, weight)
    if gemv is not None:
        return gemv(x, weight, bias, out)
    if out is None:
        return F.linear(x, weight, bias)
    assert bias is None
    return torch.mm(x, weight.t(), out=out)


def linear_silu_mul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` of the MLP's ``[gate | up] = linear(x, weight)``. The GEMV
    applies the activation as it writes its output (one kernel fewer per layer)."""
    gemv = _gemv_for(x, weight)
    if gemv is not None:
        return gemv(x, weight, gated=True)
    gate_up = linear(x, weight)
    ops = fused_ops_for(gate_up)
    if ops is not None:
        return ops.silu_and_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
