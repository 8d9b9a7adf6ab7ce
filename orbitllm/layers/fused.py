"""Fused Triton kernels for the small per-layer ops, used on CUDA tensors.

A decode step of a 28-layer model otherwise launches ~60 tiny kernels per
layer (RMSNorm alone is seven), and at small batch their fixed cost, not the
bytes moved, sets the time per token. Elsewhere the PyTorch code runs.
"""
from __future__ import annotations

import functools
from types import ModuleType

import torch


@functools.cache
def _kernels() -> ModuleType | None:
    try:
        from orbitllm.kernels import fused_ops
    except ImportError:   # no triton: the PyTorch code is correct everywhere
        return None
    return fused_ops


def fused_ops_for(x: torch.Tensor) -> ModuleType | None:
    """The fused-kernel module when ``x`` lives on a GPU and Triton is there, else None."""
    return _kernels() if x.is_cuda else None


def argmax(x: torch.Tensor) -> torch.Tensor:
    """``x.argmax(-1)``: on a GPU by the Triton kernel (a row split over many programs),
    else by torch."""
    ops = fused_ops_for(x)
    return ops.argmax(x) if ops is not None else x.argmax(-1)
