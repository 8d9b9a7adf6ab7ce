"""FP8 (E4M3) GEMM for few rows: ``(xq * x_scale) @ (w * w_scale).T`` in bfloat16, with
row-wise scales, for the steps of batched decode (tens to a few hundred rows).

cuBLASLt's FP8 kernel (``torch._scaled_mm``) uses 128 x 128 output tiles there, so a
4,096-column product gives 32-64 programs to an H200's 132 SMs: o_proj and down_proj
at 64-256 rows took as long in FP8 as in bf16 (``benchmarks/lab/scaled_mm_bench.py``).
Here the tiles are smaller, the programs of one weight tile run next to each other (the
row blocks vary fastest, so a weight tile read by several of them comes from the L2),
and both operands go to ``tl.dot`` as they are, the scales applied once to the sums.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@dataclass(frozen=True)
class Fp8GemmConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


@triton.jit
def _fp8_gemm_kernel(a_ptr, b_ptr, a_scale_ptr, b_scale_ptr, bias_ptr, c_ptr, M, N, K,
                     stride_am, stride_bn, stride_cm, HAS_BIAS: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     EVEN_K: tl.constexpr):
    """Program (row block, column block): ``BLOCK_M x BLOCK_N`` outputs, float32 sums."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok, n_ok = rm < M, rn < N
    a_ptrs = a_ptr + rm.to(tl.int64)[:, None] * stride_am + rk[None, :]
    b_ptrs = b_ptr + rn.to(tl.int64)[None, :] * stride_bn + rk[:, None]   # w[N, K] as [K, N]
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs + k, mask=m_ok[:, None], other=0.0)
            b = tl.load(b_ptrs + k, mask=n_ok[None, :], other=0.0)
        else:
            k_ok = (k + rk) < K
            a = tl.load(a_ptrs + k, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs + k, mask=n_ok[None, :] & k_ok[:, None], other=0.0)
        acc = tl.dot(a, b, acc)
    acc *= tl.load(a_scale_ptr + rm, mask=m_ok, other=0.0)[:, None]
    acc *= tl.load(b_scale_ptr + rn, mask=n_ok, other=0.0)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    c_ptrs = c_ptr + rm.to(tl.int64)[:, None] * stride_cm + rn[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


# 64 rows x 64 columns, 256-column chunks three deep: the tiles from 65 rows on.
_MID_ROWS = Fp8GemmConfig(64, 64, 256, 4, 3)


def fp8_gemm_config(m: int, n: int, k: int) -> Fp8GemmConfig | None:
    """The tiles for ``m`` rows of an ``[n, k]`` weight where they beat cuBLAS, else None
    (chosen on an H200 with Llama-3.1-8B's projections at one rank, ``fp8_gemm_sweep.py``;
    figures in ``docs/perf-log.md``): up to 64 rows every projection, 32-column tiles five
    deep and, for the wide gate_up, 128 columns; up to 128 rows all but gate_up; up to
    256 rows the matrices with no more rows than columns (o_proj, down_proj); beyond,
    cuBLAS, whose large tiles then fill the GPU."""
    if m <= 64:
        return Fp8GemmConfig(64, 128, 128, 4, 4) if n >= 4 * k else Fp8GemmConfig(64, 32, 128, 4, 5)
    if m <= 128 and n < 4 * k or m <= 256 and n <= k:
        return _MID_ROWS
    return None


def fp8_gemm(xq: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor, w_scale: torch.Tensor,
             bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16,
             config: Fp8GemmConfig | None = None) -> torch.Tensor:
    """``(xq * x_scale) @ (weight * w_scale[:, None]).T (+ bias)``: ``xq`` E4M3 ``[M, K]``
    with float32 ``x_scale`` ``[M, 1]`` (per token), ``weight`` E4M3 ``[N, K]`` with
    float32 ``w_scale`` ``[N]`` (per output channel); the result ``[M, N]`` in ``out_dtype``."""
    m, k = xq.shape
    n = weight.shape[0]
    assert weight.shape[1] == k and xq.stride(1) == 1 and weight.stride(1) == 1
    cfg = config or fp8_gemm_config(m, n, k) or _MID_ROWS
    out = torch.empty((m, n), dtype=out_dtype, device=xq.device)
    grid = (triton.cdiv(m, cfg.block_m), triton.cdiv(n, cfg.block_n))
    _fp8_gemm_kernel[grid](
        xq, weight, x_scale, w_scale, bias if bias is not None else w_scale, out, m, n, k,
        xq.stride(0), weight.stride(0), out.stride(0), HAS_BIAS=bias is not None,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, EVEN_K=k % cfg.block_k == 0,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out
