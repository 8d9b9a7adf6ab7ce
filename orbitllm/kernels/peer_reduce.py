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
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from orbitllm.kernels.fused_ops import _add_norm_store, _warps_for, rms_norm_ref
from orbitllm.kernels.pdl import pdl_enter, use_pdl

# A peer that never arrives (it died) releases the wait after this many polls: the
# engine's next NCCL collective then reports the dead rank.
MAX_POLLS = 1 << 26


@triton.jit
def _peer_reduce_norm_kernel(
    buf_addrs, flag_addrs, epoch_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr,
    slot_offset, n_cols, eps, rank, max_polls,
    WORLD: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr,
):
    # With PDL the next kernel (a GEMV) launches now and prefetches its weights while
    # this one waits for the peers.
    pdl_enter(PDL)
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
    # Rounded like an all-reduce in the model dtype, then rms_norm's add + norm.
    x = acc.to(out_ptr.dtype.element_ty).to(tl.float32)
    _add_norm_store(x, cols, mask, n_cols, eps, res_ptr + row * n_cols, w_ptr,
                    out_ptr + row * n_cols, res_out_ptr + row * n_cols, True)


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
        pdl = use_pdl(residual)
        _peer_reduce_norm_kernel[(rows,)](
            buf_addrs, flag_addrs, epochs, residual, weight, out, res_out,
            slot_offset, hidden, eps, rank, MAX_POLLS,
            WORLD=world, BLOCK=block, PDL=pdl, launch_pdl=pdl, num_warps=_warps_for(block))
    return out, res_out


def peer_reduce_add_norm_ref(partials: list[torch.Tensor], residual: torch.Tensor,
                             weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch reference: the all-reduce (sum rounded to the model dtype), then the
    fused add + RMSNorm (transformers' numerics)."""
    total = partials[0].float()
    for p in partials[1:]:   # in rank order, as the kernel adds
        total = total + p.float()
    return rms_norm_ref(total.to(residual.dtype), weight, eps, residual)
