"""The MLP's activation of its fused ``[gate | up]`` projection."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from orbitllm.layers.fused import fused_ops_for


class SiluAndMul(nn.Module):
    """``[..., 2I] -> [..., I]``: ``silu(gate) * up``, by the fused Triton kernel on a GPU.
    A ``RowParallelLinear`` given this activation applies it inside its decode GEMV
    instead, with the same rounding (``fuses_into_gemv``)."""

    fuses_into_gemv = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ops = fused_ops_for(x)
        if ops is not None:
            return ops.silu_and_mul(x)
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up
