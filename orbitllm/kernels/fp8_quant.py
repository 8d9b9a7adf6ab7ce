"""Per-token FP8 (E4M3) quantization of activations in one kernel.

``torch._scaled_mm`` needs its input in E4M3 with a float32 scale per row. In torch ops
that is about nine kernels per projection (abs, amax, casts, divide, clamp, cast), each
a launch and a round trip of the rows through memory; an 8B decode step has 128
projections. Here one program per row reads it twice (amax, then scale and store) and
writes the E4M3 row and its scale, the same numbers as ``quantize_per_token``'s torch ops.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

FP8_MAX = 448.0
MIN_SCALE = 1e-12


@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, s_ptr, K, stride_x, stride_q, FP8_MAX: tl.constexpr,
                          MIN_SCALE: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    cols = tl.arange(0, BLOCK)
    amax = tl.zeros([BLOCK], tl.float32)
    for k in range(0, K, BLOCK):
        x = tl.load(x_row + k + cols, mask=k + cols < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    scale = tl.maximum(tl.max(amax, 0) / FP8_MAX, MIN_SCALE)
    tl.store(s_ptr + row, scale)
    for k in range(0, K, BLOCK):
        x = tl.load(x_row + k + cols, mask=k + cols < K, other=0.0).to(tl.float32)
        q = tl.clamp(x / scale, -FP8_MAX, FP8_MAX)
        tl.store(q_ptr + row * stride_q + k + cols, q.to(q_ptr.dtype.element_ty), mask=k + cols < K)


def quantize_rows_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [M, K]`` (16- or 32-bit, unit column stride) -> (E4M3 ``[M, K]``, float32
    scales ``[M, 1]``): each row divided by (its amax / 448), saturated at +-448."""
    assert x.dim() == 2
    if x.stride(1) != 1:
        x = x.contiguous()
    m, k = x.shape
    q = torch.empty((m, k), dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    if m:
        _quantize_rows_kernel[(m,)](x, q, scale, k, x.stride(0), q.stride(0), FP8_MAX=FP8_MAX,
                                    MIN_SCALE=MIN_SCALE, BLOCK=min(2048, triton.next_power_of_2(k)),
                                    num_warps=4)
    return q, scale
