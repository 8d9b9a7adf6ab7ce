"""Megatron-style tensor parallelism inside the model: which slice a rank holds, and
the collectives that put the slices back together.

Column-parallel layers (QKV, gate/up) split their outputs by heads or by columns
and need no communication; row-parallel layers (o_proj, down_proj) split their
inputs, and their partial outputs are summed over the ranks together with the
residual add + RMSNorm that follows (``Shard.reduce_norm``). The vocabulary is split in even chunks
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

from orbitllm.layers.linear import linear


@dataclass(frozen=True)
class Shard:
    """This process's place among the tensor-parallel ranks (rank 0 is the driver).
    Collectives go through torch.distributed's default process group."""

    rank: int = 0
    size: int = 1
    # Fused peer-memory all-reduce + add + RMSNorm for decode-sized steps, or None.
    peer_reduce: "PeerAllReduce | None" = field(default=None, compare=False, repr=False)

    def split(self, n: int) -> tuple[int, int]:
        """(start, length) of this rank's even part of ``n``."""
        part = n // self.size
        return self.rank * part, part

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum the partial results of all ranks (in place)."""
        if self.size > 1:
            dist.all_reduce(x)
        return x

    def row_parallel(self, x: torch.Tensor, weight: torch.Tensor, slot: int) -> torch.Tensor:
        """This rank's partial ``x @ weight.T`` of a row-parallel layer (sum it with
        ``reduce_norm``). Written straight into the peer-read buffer ``slot`` when the
        fused path takes the step."""
        out = self.peer_reduce.output(x.shape[0], slot) if self.peer_reduce is not None else None
        return linear(x, weight, out=out)

    def reduce_norm(self, partial: torch.Tensor, residual: torch.Tensor, norm: nn.Module,
                    slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``norm(sum over ranks of partial, residual)``: (normed, new residual)."""
        fast = self.peer_reduce
        if fast is not None and fast.holds(partial, slot):
            return fast.reduce_add_norm(partial.shape[0], slot, residual, norm.weight, norm.eps)
        return norm(self.all_reduce(partial), residual)

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


class PeerAllReduce:
    """The all-reduces of steps of up to ``max_rows`` rows, fused with the add + RMSNorm
    after them (``kernels/peer_reduce.py``): each rank's row-parallel matmul writes
    into its slot of a torch symmetric-memory buffer, which every GPU of the group
    maps, and one kernel per call syncs the ranks, sums the slots over NVLink and
    normalizes. Larger steps (prefill) go through NCCL. No multicast (NVLS) is used.

    ``push``: the push kernel instead (each rank stores its rows into the peers'
    int64 inboxes; no flags). Not yet measured on GPUs, so off by default."""

    SLOTS = 2   # 0: attention outputs, 1: MLP outputs (they alternate)

    def __init__(self, max_rows: int, hidden: int, dtype: torch.dtype, device: torch.device,
                 push: bool = False) -> None:
        import torch.distributed._symmetric_memory as symm_mem
        group = dist.group.WORLD.group_name
        self.max_rows, self.hidden = max_rows, hidden
        self.slot_numel = max_rows * hidden
        self.buffer = symm_mem.empty(self.SLOTS * self.slot_numel, dtype=dtype, device=device)
        self.handle = symm_mem.rendezvous(self.buffer, group)
        self.rank, self.world = self.handle.rank, self.handle.world_size
        self.epochs = torch.zeros(max_rows, dtype=torch.int32, device=device)
        if push:   # per slot, one region of rows per sending rank
            self.inbox = symm_mem.empty(self.SLOTS * self.world * self.slot_numel,
                                        dtype=torch.int64, device=device)
            self.inbox_handle = symm_mem.rendezvous(self.inbox, group)
            self.inbox.zero_()
            self.abort = torch.zeros(1, dtype=torch.int32, device=device)
        else:
            # Per-row arrival flags, one per rank, in their own symmetric tensor (the
            # handle's signal pad is small and fixed in size).
            self.inbox = None
            self.flags = symm_mem.empty(max_rows * self.world, dtype=torch.int32, device=device)
            self.flags_handle = symm_mem.rendezvous(self.flags, group)
            self.flags.zero_()
        torch.cuda.synchronize(device)
        dist.barrier()   # every rank's flags / inbox are cleared before any rank signals

    def output(self, rows: int, slot: int) -> torch.Tensor | None:
        """Where this rank's partial of ``rows`` rows goes, or None (too many: NCCL)."""
        if rows > self.max_rows:
            return None
        start = slot * self.slot_numel
        return self.buffer[start:start + rows * self.hidden].view(rows, self.hidden)

    def holds(self, partial: torch.Tensor, slot: int) -> bool:
        return (partial.shape[0] <= self.max_rows and partial.data_ptr() ==
                self.buffer.data_ptr() + slot * self.slot_numel * self.buffer.element_size())

    def reduce_add_norm(self, rows: int, slot: int, residual: torch.Tensor, weight: torch.Tensor,
                        eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        from orbitllm.kernels.peer_reduce import peer_reduce_add_norm, push_reduce_add_norm
        if self.inbox is not None:
            return push_reduce_add_norm(
                self.output(rows, slot), self.inbox_handle.buffer_ptrs_dev, self.epochs, self.abort,
                self.rank, self.world, slot * self.world * self.slot_numel, self.slot_numel,
                residual, weight, eps)
        return peer_reduce_add_norm(self.handle.buffer_ptrs_dev, self.flags_handle.buffer_ptrs_dev,
                                    self.epochs, self.rank, self.world, slot * self.slot_numel,
                                    rows, residual, weight, eps)

    def release(self) -> None:
        """Let this rank's waits pass for good (a peer died and will never signal), so
        the engine reaches its next NCCL collective and reports the dead rank."""
        with torch.cuda.stream(torch.cuda.Stream(self.epochs.device)):   # beside the waiting kernel
            if self.inbox is not None:
                self.abort.fill_(1)
            else:
                self.flags.fill_(1 << 30)


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
