"""Megatron-style tensor parallelism inside the model: which slice a rank holds, and
the collectives that put the slices back together.

Column-parallel layers (QKV, gate/up) split their outputs by heads or by columns
and need no communication; row-parallel layers (o_proj, down_proj) split their
inputs and end in one all-reduce each. The vocabulary is split in even chunks
(the last padded), for the embedding (masked lookup + all-reduce) and the LM
head (logits gathered on the driver, rank 0; the tokens it samples are broadcast
back for overlapped steps). With one rank nothing here communicates, so the
single-process model runs exactly as before.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Shard:
    """This process's place among the tensor-parallel ranks (rank 0 is the driver).
    Collectives go through torch.distributed's default process group."""

    rank: int = 0
    size: int = 1
    # A faster path for the small all-reduces of decode steps (SymmMemAllReduce), or None.
    fast_all_reduce: "SymmMemAllReduce | None" = field(default=None, compare=False, repr=False)

    def split(self, n: int) -> tuple[int, int]:
        """(start, length) of this rank's even part of ``n``."""
        part = n // self.size
        return self.rank * part, part

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum the partial results of a row-parallel layer (in place)."""
        if self.size > 1 and not (self.fast_all_reduce is not None and self.fast_all_reduce(x)):
            dist.all_reduce(x)
        return x

    def gather_last_dim(self, x: torch.Tensor) -> torch.Tensor | None:
        """Concatenate every rank's ``x`` along the last dim on the driver; None elsewhere."""
        parts = [torch.empty_like(x) for _ in range(self.size)] if self.rank == 0 else None
        dist.gather(x.contiguous(), parts, dst=0)
        return torch.cat(parts, dim=-1) if parts is not None else None

    def broadcast(self, x: torch.Tensor) -> torch.Tensor:
        """The driver's ``x`` on every rank (in place: other ranks pass a buffer of its
        shape). On CUDA it is queued on the stream, without a host sync."""
        if self.size > 1:
            dist.broadcast(x, 0)
        return x

    def min_over_ranks(self, value: int, device: torch.device) -> int:
        """The smallest ``value`` of all ranks (so every rank sizes its KV cache alike)."""
        if self.size == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t.item())


class SymmMemAllReduce:
    """One-shot all-reduce through torch symmetric memory: each rank stages its partial
    sum in a buffer that every GPU of the group maps, and each GPU reads its peers'
    copies directly over NVLink. For the few rows of a decode step that is one small
    kernel, where NCCL's ring protocol takes tens of µs; messages larger than the
    buffer (prefill) go through NCCL. No multicast (NVLS) is used."""

    def __init__(self, numel: int, dtype: torch.dtype, device: torch.device) -> None:
        import torch.distributed._symmetric_memory as symm_mem
        self.group_name = dist.group.WORLD.group_name
        self.buffer = symm_mem.empty(numel, dtype=dtype, device=device)
        symm_mem.rendezvous(self.buffer, self.group_name)

    def __call__(self, x: torch.Tensor) -> bool:
        """Sum ``x`` over the ranks in place; False (nothing done) if it does not fit.
        Every rank decides alike, since all see the same shapes."""
        n = x.numel()
        if n > self.buffer.numel() or x.dtype != self.buffer.dtype or not x.is_contiguous():
            return False
        staged = self.buffer[:n]
        staged.copy_(x.view(-1))
        # The kernel's closing barrier keeps the buffer from being refilled before
        # every peer has read it.
        torch.ops.symm_mem.one_shot_all_reduce_out(staged, "sum", self.group_name, x.view(-1))
        return True


def kv_heads_per_rank(num_kv_heads: int, size: int) -> int:
    """KV heads are split when there are enough, else each rank keeps the one its
    query heads read (replicated across ``size // num_kv_heads`` ranks)."""
    return max(1, num_kv_heads // size)


def check_shardable(num_heads: int, num_kv_heads: int, intermediate_size: int, size: int) -> None:
    """Raise ValueError when a model cannot be split evenly over ``size`` ranks."""
    if size == 1:
        return
    why = None
    if num_heads % size:
        why = f"{num_heads} attention heads"
    elif num_kv_heads % size and size % num_kv_heads:
        why = f"{num_kv_heads} KV heads (neither divides the other)"
    elif intermediate_size % size:
        why = f"intermediate size {intermediate_size}"
    if why:
        raise ValueError(f"tensor_parallel_size: {size} ranks cannot split the model's {why}")


class VocabParallelEmbedding(nn.Module):
    """Each rank holds rows ``[start, start + rows)`` of the table; a token outside
    them contributes zeros, and the all-reduce fills in the owner's row."""

    def __init__(self, vocab_size: int, hidden_size: int, shard: Shard) -> None:
        super().__init__()
        self.shard = shard
        self.rows = -(-vocab_size // shard.size)
        self.start = shard.rank * self.rows
        self.weight = nn.Parameter(torch.empty(self.rows, hidden_size))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.shard.size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.start
        outside = (local < 0) | (local >= self.rows)
        x = F.embedding(local.masked_fill(outside, 0), self.weight)
        x.masked_fill_(outside[:, None], 0)
        return self.shard.all_reduce(x)
