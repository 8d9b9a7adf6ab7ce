"""Matrix-vector product for one-token decode steps: ``x @ weight.T`` with ``x`` of one row.

At batch 1 a projection reads its whole weight matrix to produce a few thousand
numbers, so its time is bytes / bandwidth plus a fixed start-up. Under tensor
parallelism the matrices halve (Llama-8B's o_proj is 16 MB per rank, about 4 µs
of reading), and cuBLAS's choice for such shapes (a split-K GEMM plus a separate
reduce kernel) ran at 55–75 % of copy bandwidth on an H200. Here each program owns
``BLOCK_N`` whole output rows and streams them through in ``BLOCK_K`` chunks: no
split, no second kernel, and small enough programs (a few per SM) that the grid
stays balanced when the matrix is small.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from orbitllm.kernels.fused_ops import silu_mul
from orbitllm.kernels.pdl import pdl_args, pdl_enter
from orbitllm.kernels.peer_reduce import send_packets


@dataclass(frozen=True)
class GemvConfig:
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    # Load the first chunk of weights before waiting for the kernel before (PDL).
    preload: bool = True


@dataclass(frozen=True)
class PeerSend:
    """A row-parallel GEMV's output, also sent to the peers as packets for the fused
    all-reduce (``kernels/peer_reduce.py``): the packet buffers' addresses (int64,
    one per rank), the element offset of the call's slot in them (the sender's part
    starts ``rank * N`` further), the call counters (int32; this call's epoch is
    ``epochs[0] + 1``), this rank and the number of ranks."""
    addrs: torch.Tensor
    offset: int
    epochs: torch.Tensor
    rank: int
    world: int


@triton.jit
def _load_w(w_ptrs, rows, cols, k, N, K, EVEN: tl.constexpr):
    if EVEN:   # N % BLOCK_N == 0 and K % BLOCK_K == 0: unmasked, vectorized loads
        return tl.load(w_ptrs + k)
    return tl.load(w_ptrs + k, mask=(rows[:, None] < N) & ((k + cols) < K)[None, :], other=0.0)


@triton.jit
def _load_x(x_ptr, cols, k, K, EVEN: tl.constexpr, SILU_MUL: tl.constexpr):
    """Columns ``k + cols`` of x, as float32. With ``SILU_MUL`` x is ``silu(gate) * up``
    of the row ``[gate | up]`` (2K long), rounded to the input dtype as
    ``silu_and_mul`` rounds it (``silu_mul``), so the fused product gives the same bits."""
    if EVEN:
        x = tl.load(x_ptr + k + cols)
    else:
        x = tl.load(x_ptr + k + cols, mask=(k + cols) < K, other=0.0)
    if SILU_MUL:
        if EVEN:
            up = tl.load(x_ptr + K + k + cols)
        else:
            up = tl.load(x_ptr + K + k + cols, mask=(k + cols) < K, other=0.0)
        x = silu_mul(x, up).to(x_ptr.dtype.element_ty)
    return x.to(tl.float32)


@triton.jit
def _widen_w(w, s_ptr, rows, cols, k, N, K, stride_sn, SCALE_COLS: tl.constexpr):
    """The weights as float32; with ``SCALE_COLS`` (block-wise FP8) each multiplied by
    the scale of its row and block of ``SCALE_COLS`` columns."""
    w = w.to(tl.float32)
    if SCALE_COLS > 0:
        blocks = (k + cols) // SCALE_COLS
        w *= tl.load(s_ptr + rows.to(tl.int64)[:, None] * stride_sn + blocks[None, :],
                     mask=(rows[:, None] < N) & ((k + cols) < K)[None, :], other=0.0)
    return w


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, s_ptr, b_ptr, out_ptr, N, K, stride_wn, stride_sn, send_addrs, send_offset,
    epoch_ptr, rank, HAS_SCALE: tl.constexpr, SCALE_COLS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN: tl.constexpr,
    PDL: tl.constexpr, PRELOAD: tl.constexpr, SEND: tl.constexpr, WORLD: tl.constexpr,
    SILU_MUL: tl.constexpr,
):
    """Program p: output elements ``[p * BLOCK_N, (p + 1) * BLOCK_N)``, float32 sums.

    With ``PRELOAD`` the program loads its first chunk of weights, which no kernel
    writes, before it waits for the kernel before (PDL): the programs resident while
    that kernel runs (a norm, the attention, the all-reduce: few programs, a few µs)
    start with their first chunk in registers. With ``SEND`` the output also goes
    to the peers as packets (``PeerSend``). With ``SILU_MUL`` the input is the MLP's
    ``[gate | up]`` row and the product takes ``silu(gate) * up``: the activation's own
    kernel, and its boundary in the step, go away. With ``HAS_SCALE`` the weights are
    FP8, widened in registers, and each output row's sum is multiplied by its scale (or,
    with ``SCALE_COLS``, each weight by its block's scale as it is widened)."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + rows.to(tl.int64)[:, None] * stride_wn + cols[None, :]
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    if PRELOAD:
        w = _load_w(w_ptrs, rows, cols, 0, N, K, EVEN)
        pdl_enter(PDL)
        acc += _widen_w(w, s_ptr, rows, cols, 0, N, K, stride_sn, SCALE_COLS) * \
            _load_x(x_ptr, cols, 0, K, EVEN, SILU_MUL)[None, :]
    else:
        pdl_enter(PDL)
    for k in range(BLOCK_K if PRELOAD else 0, K, BLOCK_K):
        x = _load_x(x_ptr, cols, k, K, EVEN, SILU_MUL)
        w = _load_w(w_ptrs, rows, cols, k, N, K, EVEN)
        acc += _widen_w(w, s_ptr, rows, cols, k, N, K, stride_sn, SCALE_COLS) * x[None, :]
    y = tl.sum(acc, 1)
    if HAS_SCALE and SCALE_COLS == 0:
        y *= tl.load(s_ptr + rows, mask=rows < N, other=0.0)
    if HAS_BIAS:
        y += tl.load(b_ptr + rows, mask=rows < N, other=0.0).to(tl.float32)
    y = y.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + rows, y, mask=rows < N)
    if SEND:
        send_packets(y, rows, rows < N, send_addrs, send_offset + rank * N, epoch_ptr, rank, WORLD)


def default_gemv_config(n: int, k: int) -> GemvConfig:
    """4-row programs streaming 1024-column chunks three deep, and 8 rows for long rows
    (down_proj), whose chunks of input cost more (two loads and the SiLU): the best for
    Llama-8B's shapes at N=1 and N=2 when each projection's configs are tried inside a
    decode step (PDL, the SiLU·mul fused into down_proj). Timed alone, wider tiles win,
    so configs are chosen in the step (measurements: ``docs/perf-log.md``)."""
    if k >= 7168:
        return GemvConfig(block_n=8, block_k=1024, num_warps=4, num_stages=3)
    return GemvConfig(block_n=4, block_k=1024, num_warps=4, num_stages=3)


def default_fp8_gemv_config(n: int, k: int) -> GemvConfig:
    """The tiles for E4M3 weights, chosen in the step as ``default_gemv_config``'s
    (``gemv_chain_tune.py --fp8``): 8-row programs of 512-column chunks two deep for the
    wide matrices (qkv, gate_up), 8 x 1024 with 8 warps for down_proj's long rows, and
    4 x 1024 two deep for o_proj: one-byte weights want other tiles than two-byte ones
    (measurements: ``docs/perf-log.md``)."""
    if k >= 7168:
        return GemvConfig(block_n=8, block_k=1024, num_warps=8, num_stages=1)
    if n > k:
        return GemvConfig(block_n=8, block_k=512, num_warps=4, num_stages=2)
    return GemvConfig(block_n=4, block_k=1024, num_warps=4, num_stages=2)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
         out: torch.Tensor | None = None, config: GemvConfig | None = None,
         send: PeerSend | None = None, silu_mul: bool = False,
         weight_scale: torch.Tensor | None = None) -> torch.Tensor:
    """``x [1, K] @ weight[N, K].T (+ bias)`` -> ``[1, N]`` in ``x``'s dtype, written into
    ``out`` when given, and sent to the peers with ``send`` (16-bit ``x`` only).
    ``weight_scale``: float32, the scales of FP8 (E4M3) weights, ``[N]`` per output row
    (the product is ``x @ (weight * weight_scale[:, None]).T``, in half the bytes) or
    ``[N, ceil(K / c)]`` per row and block of ``c`` columns (``layers/quantization``).
    With ``silu_mul``, ``x`` is ``[1, 2K]`` = ``[gate | up]`` and the product takes
    ``silu_and_mul(x)``. ``weight`` needs contiguous rows; ``x`` is made contiguous."""
    assert x.dim() == 2 and x.shape[0] == 1, "gemv takes one row"
    n, k = weight.shape
    assert x.shape[1] == (2 * k if silu_mul else k) and weight.stride(1) == 1
    x = x.contiguous()
    if out is None:
        out = torch.empty((1, n), dtype=x.dtype, device=x.device)
    assert out.shape == (1, n) and out.is_contiguous()
    cfg = config or (default_gemv_config if weight_scale is None else default_fp8_gemv_config)(n, k)
    block_k = min(cfg.block_k, triton.next_power_of_2(k))
    assert send is None or x.element_size() == 2, "packets carry 16-bit values"
    scale_cols, scale_stride = 0, 0
    if weight_scale is not None and weight_scale.dim() == 2:   # block-wise
        scale_cols, scale_stride = -(-k // weight_scale.shape[1]), weight_scale.stride(0)
    _gemv_kernel[(triton.cdiv(n, cfg.block_n),)](
        x, weight, weight_scale if weight_scale is not None else x, bias if bias is not None else x,
        out, n, k, weight.stride(0), scale_stride,
        send.addrs if send else x, send.offset if send else 0, send.epochs if send else x,
        send.rank if send else 0,
        HAS_SCALE=weight_scale is not None, SCALE_COLS=scale_cols, HAS_BIAS=bias is not None, BLOCK_N=cfg.block_n, BLOCK_K=block_k,
        EVEN=n % cfg.block_n == 0 and k % block_k == 0,
        PRELOAD=cfg.preload, SEND=send is not None, WORLD=send.world if send else 1,
        SILU_MUL=silu_mul, **pdl_args(x),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out
