"""All-reduce fused with the residual add and RMSNorm that follow it, reading the
peers' partial sums straight from their GPU memory (mapped into every rank's process
with CUDA IPC, ``layers/tensor_parallel.py``).

A decode step under tensor parallelism ends each attention and MLP block with an
all-reduce of a few KB, then an add + RMSNorm. Through NCCL that is two kernels and
~9 µs per block, mostly latency. Here one program per row (1) tells every rank it
has reached this call, (2) waits until every rank has, (3) sums the partials of all
ranks in rank order, adds the residual and normalizes: one kernel, one round trip.

Each rank's row-parallel matmul writes its partial into its own slot of a buffer
every peer maps. Attention outputs use slot 0 and MLP outputs slot 1; since they
alternate, a rank overwrites a slot only after passing the next call's barrier,
which every peer enters only once it has finished reading that slot: no closing
barrier is needed. The per-row call counters (epochs) advance alike on every rank
because every rank runs the same calls in the same order.

One-row steps of a 16-bit model skip the barrier and the reads over NVLink: the
row-parallel GEMV itself stores each output element into every peer's packet
buffer as one 8-byte packet, the value's bits in the low half and the call's epoch
in the high half (``send_packets``). The reader polls its own packets until all
carry the current epoch; an 8-byte store arrives whole, so no fence or flag is
needed (NCCL's LL protocol works the same way). The data then crosses NVLink while
the peers' GEMVs are still running, and the wait ends one write latency after the
slowest peer's GEMV. A peer overwrites a slot's packets only after receiving this
rank's packets of the other slot, which this rank sends after it has read them.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from orbitllm.kernels.fused_ops import _add_norm_store, _warps_for, rms_norm_ref
from orbitllm.kernels.pdl import pdl_args, pdl_enter

# A peer that never arrives (it died) releases the wait after this many polls: the
# engine's next NCCL collective then reports the dead rank.
MAX_POLLS = 1 << 26
# A flag value no call reaches: ``PeerAllReduce.release`` writes it to end every wait.
RELEASED: tl.constexpr = tl.constexpr(1 << 30)


@triton.jit
def _peer_reduce_norm_kernel(
    buf_addrs, flag_addrs, epoch_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr,
    pk_addrs, pk_offset, slot_offset, n_cols, eps, rank, max_polls,
    WORLD: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr, PACKETS: tl.constexpr,
):
    # With PDL the next kernel (a GEMV) launches now and loads its first weights while
    # this one waits for the peers.
    pdl_enter(PDL)
    row = tl.program_id(0)
    epoch = tl.load(epoch_ptr + row) + 1
    tl.store(epoch_ptr + row, epoch)
    flags = flag_addrs.to(tl.pointer_type(tl.int64))
    own_flags = tl.load(flags + rank).to(tl.pointer_type(tl.int32))
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    bufs = buf_addrs.to(tl.pointer_type(tl.int64))
    acc = tl.zeros([BLOCK], tl.float32)
    if PACKETS:   # one row: the peers' GEMVs sent their partials as packets
        own = tl.load(bufs + rank).to(tl.pointer_type(out_ptr.dtype.element_ty))
        packets = tl.load(pk_addrs.to(tl.pointer_type(tl.int64)) + rank).to(tl.pointer_type(tl.int64))
        for p in tl.static_range(WORLD):   # in rank order, as below
            if p == rank:
                part = tl.load(own + slot_offset + cols, mask=mask, other=0.0)
            else:
                part = _receive(packets + pk_offset + p * n_cols + cols, mask, epoch,
                                own_flags + row * WORLD + rank, max_polls, out_ptr.dtype.element_ty)
            acc += part.to(tl.float32)
    else:
        acc = _exchange_and_sum(bufs, flags, own_flags, acc, cols, mask, row, epoch, slot_offset,
                                n_cols, rank, max_polls, out_ptr.dtype.element_ty, WORLD)
    # Rounded like an all-reduce in the model dtype, then rms_norm's add + norm.
    x = acc.to(out_ptr.dtype.element_ty).to(tl.float32)
    _add_norm_store(x, cols, mask, n_cols, eps, res_ptr + row * n_cols, w_ptr,
                    out_ptr + row * n_cols, res_out_ptr + row * n_cols, True)


@triton.jit
def _exchange_and_sum(bufs, flags, own_flags, acc, cols, mask, row, epoch, slot_offset, n_cols,
                      rank, max_polls, dtype: tl.constexpr, WORLD: tl.constexpr):
    """The barrier, then the partials of every rank read where they lie."""
    # (1) This row's call number, announced to every rank (release: our partial,
    # written by the matmul before this kernel, is visible to whoever sees it).
    for p in tl.static_range(WORLD):
        peer_flags = tl.load(flags + p).to(tl.pointer_type(tl.int32))
        tl.atomic_xchg(peer_flags + row * WORLD + rank, epoch, sem="release", scope="sys")
    # (2) Wait for every rank's announcement (int32 differences survive wrap-around;
    # a peer is never more than one call ahead).
    for p in tl.static_range(WORLD):
        seen = tl.atomic_add(own_flags + row * WORLD + p, 0, sem="acquire", scope="sys")
        polls = 0
        while (seen - epoch < 0) & (polls < max_polls):
            seen = tl.atomic_add(own_flags + row * WORLD + p, 0, sem="acquire", scope="sys")
            polls += 1
    # (3) Sum in rank order (every rank gets the same bits).
    for p in tl.static_range(WORLD):
        part = tl.load(bufs + p).to(tl.pointer_type(dtype))
        acc += tl.load(part + slot_offset + row * n_cols + cols, mask=mask, other=0.0,
                       volatile=True).to(tl.float32)
    return acc


@triton.jit
def send_packets(vals, idx, mask, pk_addrs, offset, epoch_ptr, rank, WORLD: tl.constexpr):
    """Store 16-bit ``vals`` at ``offset + idx`` of every peer's packet buffer, each
    with the coming call's epoch (``epoch_ptr``'s counter + 1) in the high half."""
    epoch = tl.load(epoch_ptr) + 1
    bits = vals.to(tl.int16, bitcast=True).to(tl.int64) & 0xFFFF
    packets = (epoch.to(tl.int64) << 32) | bits
    table = pk_addrs.to(tl.pointer_type(tl.int64))
    for p in tl.static_range(WORLD):
        if p != rank:
            dst = tl.load(table + p).to(tl.pointer_type(tl.int64))
            tl.store(dst + offset + idx, packets, mask=mask)


@triton.jit
def _receive(ptrs, mask, epoch, release_ptr, max_polls, dtype: tl.constexpr):
    """Poll the packets at ``ptrs`` until every one carries ``epoch`` (or the wait is
    released, ``PeerAllReduce.release``); their values, as ``dtype``."""
    pk = tl.load(ptrs, mask=mask, other=0, volatile=True)
    missing = tl.sum((((pk >> 32).to(tl.int32) != epoch) & mask).to(tl.int32), 0)
    polls = 0
    while (missing > 0) & (polls < max_polls):
        pk = tl.load(ptrs, mask=mask, other=0, volatile=True)
        missing = tl.sum((((pk >> 32).to(tl.int32) != epoch) & mask).to(tl.int32), 0)
        polls += 1
        if tl.load(release_ptr, volatile=True) >= RELEASED:
            polls = max_polls
    return (pk & 0xFFFF).to(tl.int16).to(dtype, bitcast=True)


def peer_reduce_add_norm(buf_addrs: int, flag_addrs: int, epochs: torch.Tensor, rank: int,
                         world: int, slot_offset: int, rows: int, residual: torch.Tensor,
                         weight: torch.Tensor, eps: float, packet_addrs: int | None = None,
                         packet_offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(norm(sum_r partial_r + residual), sum_r partial_r + residual)`` for ``rows`` rows.

    ``buf_addrs``/``flag_addrs``: device addresses of arrays holding every rank's
    buffer and arrival-flag array; rank r's partial starts ``slot_offset`` elements
    into its buffer, rows of ``residual.shape[-1]`` contiguous elements. ``epochs``:
    int32 per-row call counters, kept by the caller across calls. With
    ``packet_addrs`` (one row, the address of every rank's packet buffer): the peers'
    partials come as packets from ``packet_offset`` in this rank's buffer, peer p's
    ``p * hidden`` further on; this rank's own partial is read from its buffer.
    """
    hidden = residual.shape[-1]
    residual = residual.reshape(-1, hidden)
    assert residual.is_contiguous() and rows <= epochs.numel()
    assert packet_addrs is None or rows == 1, "packets carry one row"
    out = torch.empty_like(residual)
    res_out = torch.empty_like(residual)
    if rows:
        block = triton.next_power_of_2(hidden)
        _peer_reduce_norm_kernel[(rows,)](
            buf_addrs, flag_addrs, epochs, residual, weight, out, res_out,
            packet_addrs or 0, packet_offset, slot_offset, hidden, eps, rank, MAX_POLLS,
            WORLD=world, BLOCK=block, PACKETS=packet_addrs is not None, **pdl_args(residual),
            num_warps=_warps_for(block))
    return out, res_out


def peer_reduce_add_norm_ref(partials: list[torch.Tensor], residual: torch.Tensor,
                             weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch reference: the all-reduce (sum rounded to the model dtype), then the
    fused add + RMSNorm (transformers' numerics)."""
    total = partials[0].float()
    for p in partials[1:]:   # in rank order, as the kernel adds
        total = total + p.float()
    return rms_norm_ref(total.to(residual.dtype), weight, eps, residual)
