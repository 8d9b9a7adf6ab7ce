"""All-reduce fused with the residual add and RMSNorm that follow it, reading the
peers' partial sums straight from their GPU memory (torch symmetric memory).

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
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from orbitllm.kernels.fused_ops import _warps_for, rms_norm_ref

# A peer that never arrives (it died) releases the wait after this many polls: the
# engine's next NCCL collective then reports the dead rank.
MAX_POLLS = 1 << 26


@triton.jit
def _add_norm_store(acc, row, cols, mask, n_cols, eps, res_ptr, w_ptr, out_ptr, res_out_ptr):
    """Round the reduced row like an all-reduce in the model dtype, then the residual
    add and RMSNorm of ``rms_norm``; store both."""
    x = acc.to(out_ptr.dtype.element_ty).to(tl.float32)
    x += tl.load(res_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    x = x.to(res_out_ptr.dtype.element_ty)
    tl.store(res_out_ptr + row * n_cols + cols, x, mask=mask)
    x = x.to(tl.float32)
    inv_rms = tl.math.rsqrt(tl.sum(x * x, 0) / n_cols + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    y = (x * inv_rms).to(out_ptr.dtype.element_ty).to(tl.float32) * w
    tl.store(out_ptr + row * n_cols + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _peer_reduce_norm_kernel(
    buf_addrs, flag_addrs, epoch_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr,
    slot_offset, n_cols, eps, rank, max_polls,
    WORLD: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    # (1) This row's call number, announced to every rank (release: our partial,
    # written by the matmul before this kernel, is visible to whoever sees it).
    epoch = tl.load(epoch_ptr + row) + 1
    tl.store(epoch_ptr + row, epoch)
    flags = flag_addrs.to(tl.pointer_type(tl.int64))
    for p in tl.static_range(WORLD):
        peer_flags = tl.load(flags + p).to(tl.pointer_type(tl.int32))
        tl.atomic_xchg(peer_flags + row * WORLD + rank, epoch, sem="release", scope="sys")
    # (2) Wait for every rank's announcement (int32 differences survive wrap-around;
    # a peer is never more than one call ahead).
    own_flags = tl.load(flags + rank).to(tl.pointer_type(tl.int32))
    for p in tl.static_range(WORLD):
        seen = tl.atomic_add(own_flags + row * WORLD + p, 0, sem="acquire", scope="sys")
        polls = 0
        while (seen - epoch < 0) & (polls < max_polls):
            seen = tl.atomic_add(own_flags + row * WORLD + p, 0, sem="acquire", scope="sys")
            polls += 1
    # (3) Sum in rank order (every rank gets the same bits), then add + norm.
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    bufs = buf_addrs.to(tl.pointer_type(tl.int64))
    acc = tl.zeros([BLOCK], tl.float32)
    for p in tl.static_range(WORLD):
        part = tl.load(bufs + p).to(tl.pointer_type(out_ptr.dtype.element_ty))
        acc += tl.load(part + slot_offset + row * n_cols + cols, mask=mask, other=0.0,
                       volatile=True).to(tl.float32)
    _add_norm_store(acc, row, cols, mask, n_cols, eps, res_ptr, w_ptr, out_ptr, res_out_ptr)


def peer_reduce_add_norm(buf_addrs: int, flag_addrs: int, epochs: torch.Tensor, rank: int,
                         world: int, slot_offset: int, rows: int, residual: torch.Tensor,
                         weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(norm(sum_r partial_r + residual), sum_r partial_r + residual)`` for ``rows`` rows.

    ``buf_addrs``/``flag_addrs``: device addresses of arrays holding every rank's
    buffer and arrival-flag array; rank r's partial starts ``slot_offset`` elements
    into its buffer, rows of ``residual.shape[-1]`` contiguous elements. ``epochs``:
    int32 per-row call counters, kept by the caller across calls.
    """
    hidden = residual.shape[-1]
    residual = residual.reshape(-1, hidden)
    assert residual.is_contiguous() and rows <= epochs.numel()
    out = torch.empty_like(residual)
    res_out = torch.empty_like(residual)
    if rows:
        block = triton.next_power_of_2(hidden)
        _peer_reduce_norm_kernel[(rows,)](
            buf_addrs, flag_addrs, epochs, residual, weight, out, res_out,
            slot_offset, hidden, eps, rank, MAX_POLLS,
            WORLD=world, BLOCK=block, num_warps=_warps_for(block))
    return out, res_out


@triton.jit
def _push_reduce_norm_kernel(
    part_ptr, inbox_addrs, epoch_ptr, abort_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr,
    slot_offset, rank_stride, n_cols, eps, rank, max_polls,
    WORLD: tl.constexpr, BLOCK: tl.constexpr,
):
    """The same result as ``_peer_reduce_norm_kernel``, with the data moving the other
    way and no flags or fences. Each rank pushes its partial row (as float32) into every
    peer's inbox with plain stores, each 8-byte word carrying one value beside this
    call's epoch; a word is written whole, so a receiver that reads the epoch it
    expects in every word of a row also holds that row's data. The wait is on local
    memory (NCCL's LL protocol works this way)."""
    row = tl.program_id(0)
    epoch = tl.load(epoch_ptr + row) + 1
    tl.store(epoch_ptr + row, epoch)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    mine = tl.load(part_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    tag = epoch.to(tl.int64) << 32
    word = tag | (mine.to(tl.int32, bitcast=True).to(tl.int64) & 0xFFFFFFFF)
    inboxes = inbox_addrs.to(tl.pointer_type(tl.int64))
    at = slot_offset + rank * rank_stride + row * n_cols + cols
    for p in tl.static_range(WORLD):
        if p != rank:
            peer = tl.load(inboxes + p).to(tl.pointer_type(tl.int64))
            tl.store(peer + at, word, mask=mask)
    own = tl.load(inboxes + rank).to(tl.pointer_type(tl.int64))
    acc = tl.zeros([BLOCK], tl.float32)
    for p in tl.static_range(WORLD):   # in rank order: every rank gets the same bits
        if p == rank:
            acc += mine
        else:
            src = own + slot_offset + p * rank_stride + row * n_cols + cols
            got = tl.load(src, mask=mask, other=tag, volatile=True)
            polls = 0
            while (tl.min(((got >> 32).to(tl.int32) == epoch).to(tl.int32), 0) == 0) \
                    & (polls < max_polls) & (tl.load(abort_ptr, volatile=True) == 0):
                got = tl.load(src, mask=mask, other=tag, volatile=True)
                polls += 1
            acc += (got & 0xFFFFFFFF).to(tl.int32).to(tl.float32, bitcast=True)
    _add_norm_store(acc, row, cols, mask, n_cols, eps, res_ptr, w_ptr, out_ptr, res_out_ptr)


def push_reduce_add_norm(partial: torch.Tensor, inbox_addrs: int, epochs: torch.Tensor,
                         abort: torch.Tensor, rank: int, world: int, slot_offset: int,
                         rank_stride: int, residual: torch.Tensor, weight: torch.Tensor,
                         eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``peer_reduce_add_norm`` by pushing: ``partial`` (this rank's rows, contiguous)
    goes into every peer's int64 inbox at ``slot_offset + rank * rank_stride`` (in
    words); the peers' rows are read from this rank's own inbox. A nonzero ``abort``
    (int32, set when a peer died) ends the waits."""
    hidden = residual.shape[-1]
    residual = residual.reshape(-1, hidden)
    rows = partial.shape[0]
    assert residual.is_contiguous() and partial.is_contiguous() and rows <= epochs.numel()
    out = torch.empty_like(residual)
    res_out = torch.empty_like(residual)
    if rows:
        block = triton.next_power_of_2(hidden)
        _push_reduce_norm_kernel[(rows,)](
            partial, inbox_addrs, epochs, abort, residual, weight, out, res_out,
            slot_offset, rank_stride, hidden, eps, rank, MAX_POLLS,
            WORLD=world, BLOCK=block, num_warps=_warps_for(block))
    return out, res_out


def peer_reduce_add_norm_ref(partials: list[torch.Tensor], residual: torch.Tensor,
                             weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch reference: the all-reduce (sum rounded to the model dtype), then the
    fused add + RMSNorm (transformers' numerics)."""
    total = partials[0].float()
    for p in partials[1:]:   # in rank order, as the kernel adds
        total = total + p.float()
    return rms_norm_ref(total.to(residual.dtype), weight, eps, residual)
