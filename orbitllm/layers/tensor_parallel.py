"""Megatron-style tensor parallelism inside the model: which ranks there are, and the
collectives that put their slices back together.

The layers that hold slices (``linear.py``, ``embedding.py``) and the norm that sums the
row-parallel layers' partial outputs (``norm.RMSNorm``) call these. The fused
peer-memory all-reduce (``PeerAllReduce``) replaces NCCL in decode-sized steps. With
one rank nothing here communicates, so the single-process model runs exactly as before.
"""
from __future__ import annotations

import enum
import inspect
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from orbitllm.layers.matmul import gemv_enabled


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


class ReduceSlot(enum.IntEnum):
    """The fused all-reduce's two buffers. A peer may still read a rank's partial of one
    row-parallel layer while the rank computes the next, so consecutive row-parallel
    layers alternate: a decoder's attention output (``o_proj``) and MLP output
    (``down_proj``) each take their own."""

    ATTENTION = 0
    MLP = 1


class PeerAllReduce:
    """The all-reduces of steps of up to ``max_rows`` rows, fused with the add + RMSNorm
    after them (``kernels/peer_reduce.py``): each rank's row-parallel matmul writes
    into its slot of a buffer that every GPU of the group maps (``map_peers``), and one
    kernel per call syncs the ranks, sums the slots over NVLink and normalizes. In
    one-row steps of a 16-bit model the GEMV sends its output to the peers' packet
    buffers instead, and the kernel only waits for the packets. Larger steps
    (prefill) go through NCCL."""

    SLOTS = len(ReduceSlot)

    def __init__(self, max_rows: int, hidden: int, dtype: torch.dtype, device: torch.device) -> None:
        self.max_rows, self.hidden = max_rows, hidden
        self.slot_numel = max_rows * hidden
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.buffer = torch.zeros(self.SLOTS * self.slot_numel, dtype=dtype, device=device)
        # Per-row arrival flags, one per rank; the per-row call counters stay local.
        self.flags = torch.zeros(max_rows * self.world, dtype=torch.int32, device=device)
        self.epochs = torch.zeros(max_rows, dtype=torch.int32, device=device)
        # One-row packets: [slot][sender rank][hidden], (epoch << 32) | value bits.
        self.packets = torch.zeros(self.SLOTS * self.world * hidden, dtype=torch.int64, device=device)
        # The GEMV, which sends them, takes the one-row matmuls of 16-bit models.
        self.sends_packets = dtype in (torch.bfloat16, torch.float16) and gemv_enabled()
        torch.cuda.synchronize(device)   # every rank's flags are cleared before any peer maps them
        peer_buffers, self.buffer_addrs = map_peers(self.buffer)
        peer_flags, self.flag_addrs = map_peers(self.flags)
        peer_packets, self.packet_addrs = map_peers(self.packets)
        self._peers = peer_buffers + peer_flags + peer_packets   # keeps the mappings open
        from orbitllm.kernels.gemv import PeerSend
        self._sends = [PeerSend(self.packet_addrs, self._packet_offset(slot), self.epochs,
                                self.rank, self.world) for slot in range(self.SLOTS)]
        dist.barrier()

    def output(self, rows: int, slot: int) -> torch.Tensor | None:
        """Where this rank's partial of ``rows`` rows goes, or None (too many: NCCL)."""
        if rows > self.max_rows:
            return None
        start = slot * self.slot_numel
        return self.buffer[start:start + rows * self.hidden].view(rows, self.hidden)

    def uses_packets(self, rows: int) -> bool:
        """Whether a call of ``rows`` rows goes by packets (the matmul sends them and the
        reduction waits for them)."""
        return self.sends_packets and rows == 1

    def send(self, rows: int, slot: int):
        """The GEMV's ``PeerSend`` for a row-parallel product of ``rows`` rows into
        ``slot``, or None when the call does not go by packets (only the Triton GEMV
        sends them)."""
        return self._sends[slot] if self.uses_packets(rows) else None

    def _packet_offset(self, slot: int) -> int:
        return slot * self.world * self.hidden

    def slot_holding(self, partial: torch.Tensor) -> int | None:
        """The slot whose buffer ``partial`` is (written there by a row-parallel layer),
        or None: a partial of a step too large for the buffer, summed by NCCL."""
        if partial.shape[0] > self.max_rows:
            return None
        offset = partial.data_ptr() - self.buffer.data_ptr()
        step = self.slot_numel * self.buffer.element_size()
        slot, rest = divmod(offset, step)
        return slot if rest == 0 and 0 <= slot < self.SLOTS else None

    def reduce_add_norm(self, rows: int, slot: int, residual: torch.Tensor, weight: torch.Tensor,
                        eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        from orbitllm.kernels.peer_reduce import peer_reduce_add_norm
        return peer_reduce_add_norm(self.buffer_addrs.data_ptr(), self.flag_addrs.data_ptr(),
                                    self.epochs, self.rank, self.world, slot * self.slot_numel,
                                    rows, residual, weight, eps,
                                    self.packet_addrs.data_ptr() if self.uses_packets(rows) else None,
                                    self._packet_offset(slot))

    def release(self) -> None:
        """Let this rank's waits pass for good (a peer died and will never signal), so
        the engine reaches its next NCCL collective and reports the dead rank. (The
        packet waits watch this rank's own flag for it.)"""
        from orbitllm.kernels.peer_reduce import RELEASED
        with torch.cuda.stream(torch.cuda.Stream(self.epochs.device)):   # beside the waiting kernel
            self.flags.fill_(RELEASED.value)

    def close(self) -> None:
        """Unmap the peers' memory (at shutdown, once no kernel can touch it)."""
        self._peers = []


def map_peers(local: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Every rank's ``local`` (same shape on all ranks; a collective): the peers'
    tensors mapped into this process, and all ranks' device addresses in rank order,
    as an int64 tensor on this rank's device for the kernels.

    The memory is shared with CUDA IPC the way torch.multiprocessing shares CUDA
    tensors, except that a peer's tensor is opened on this rank's own device (with
    lazy peer access), so no process creates a context on another GPU. The mapped
    tensors are only ever touched by kernels, through the addresses. (torch's
    symmetric memory did this job at first, but its rendezvous numbers its store keys
    with a process-wide counter, so a second engine in the driver's process waited
    forever on keys the fresh workers never wrote.)"""
    from torch.multiprocessing.reductions import rebuild_cuda_tensor, reduce_tensor
    _, handle = reduce_tensor(local)
    handles: list = [None] * dist.get_world_size()
    dist.all_gather_object(handles, handle)
    names = list(inspect.signature(rebuild_cuda_tensor).parameters)
    tensors = []
    for rank, h in enumerate(handles):
        if rank == dist.get_rank():
            tensors.append(local)
        else:
            args = dict(zip(names, h), storage_device=local.device.index)
            tensors.append(rebuild_cuda_tensor(**args))
    addrs = torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64, device=local.device)
    return [t for t in tensors if t is not local], addrs


def kv_heads_per_rank(num_kv_heads: int, size: int) -> int:
    """KV heads are split when there are enough, else each rank keeps the one its
    query heads read (replicated across ``size // num_kv_heads`` ranks)."""
    return max(1, num_kv_heads // size)


def first_kv_head(num_kv_heads: int, shard: Shard) -> int:
    """The first of the model's ``num_kv_heads`` that rank ``shard.rank`` holds (with
    replicated KV heads, the one its query heads read)."""
    return shard.rank * num_kv_heads // shard.size


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
