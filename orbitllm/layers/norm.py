"""RMSNorm, optionally fused with the residual add that precedes it and, under tensor
parallelism, with the sum of the row-parallel partial outputs before that."""
from __future__ import annotations

import torch
from torch import nn

from orbitllm.layers.fused import fused_ops_for
from orbitllm.layers.tensor_parallel import Shard


class RMSNorm(nn.Module):
    """``shard``: the ranks over which ``x`` is a row-parallel layer's partial output
    where ``forward`` gets a ``residual`` (the default, one rank: ``x`` is whole). It is
    summed over them first: by the fused peer-memory kernel (sum + add + norm in one)
    when the partial sits in its buffer, else by an all-reduce."""

    def __init__(self, dim: int, eps: float, shard: Shard = Shard()) -> None:
        super().__init__()
        self.eps = eps
        self.shard = shard
        self.weight = nn.Parameter(torch.ones(dim))

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """Without ``residual``: norm(x). With it: (norm(x + residual), x + residual),
        ``x`` summed over the ranks."""
        if residual is not None:
            fast = self.shard.peer_reduce
            slot = fast.slot_holding(x) if fast is not None else None
            if slot is not None:
                return fast.reduce_add_norm(x.shape[0], slot, residual, self.weight, self.eps)
            x = self.shard.all_reduce(x)
        return self._add_norm(x, residual)

    def _add_norm(self, x: torch.Tensor, residual: torch.Tensor | None):
        ops = fused_ops_for(x)
        if ops is not None:
            return ops.rms_norm(x, self.weight, self.eps, residual)
        if residual is None:
            return self._norm(x)
        x = x + residual
        return self._norm(x), x
