"""A one-row FP8 product on the tensor cores, timed alone per Llama-3.1-8B shape,
against the FP8 GEMV (``kernels/gemv.py``) and the bf16 one.

The FP8 GEMV widens every E4M3 weight on the CUDA cores (``fp8_gemv_widen.py``: integer
bit tricks were slower still), and reads 2.4-3.5 TB/s where the bf16 GEMV reads ~4.
Here the weights go to ``tl.dot`` as they are: each ``BLOCK_K`` chunk of the input row
is quantized to E4M3 with its own scale (amax / 448) in the kernel, broadcast to the
16 columns ``tl.dot`` needs, multiplied on the tensor cores, and the chunk's product
scaled into a float32 sum. ``SPLIT`` programs share a row block's K range and add
their sums atomically into a float32 output (zeroed first; timed with it), so that
even 4,096-row matrices give every SM work.

    PYTHONPATH=. python3 benchmarks/lab/fp8_gemv_dot.py
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from graph_timing import us_per_call

from orbitllm.kernels.gemv import gemv
from orbitllm.layers.quantization.fp8_kernels import quantize_rows

SHAPES = {"qkv": (6144, 4096), "o_proj": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
# (BLOCK_N, BLOCK_K, SPLIT, num_warps, num_stages)
TILES = [(64, 256, 1, 4, 4), (64, 256, 2, 4, 4), (64, 512, 2, 4, 3), (128, 256, 1, 4, 4),
         (128, 256, 2, 4, 4), (64, 256, 4, 4, 4), (128, 512, 2, 8, 3), (32, 512, 1, 4, 3),
         (16, 512, 1, 4, 3), (64, 128, 2, 4, 6)]
COPIES = 8


@triton.jit
def _dot_kernel(x_ptr, w_ptr, s_ptr, out_ptr, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                SPLIT: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_K)
    part = K // SPLIT
    k0 = tl.program_id(1) * part
    w_ptrs = w_ptr + rows.to(tl.int64)[:, None] * K + cols[None, :]
    acc = tl.zeros([BLOCK_N, 16], tl.float32)
    for k in range(k0, k0 + part, BLOCK_K):
        x = tl.load(x_ptr + k + cols).to(tl.float32)
        sx = tl.maximum(tl.max(tl.abs(x), 0) / 448.0, 1e-12)
        xq = (x / sx).to(tl.float8e4nv)
        xb = tl.broadcast_to(xq[:, None], [BLOCK_K, 16])
        acc += tl.dot(tl.load(w_ptrs + k), xb) * sx
    y = tl.max(acc, 1) * tl.load(s_ptr + rows)
    if SPLIT == 1:
        tl.store(out_ptr + rows, y)
    else:
        tl.atomic_add(out_ptr + rows, y, sem="relaxed")


def run(x, w, s, out32, tile) -> None:
    bn, bk, split, warps, stages = tile
    n, k = w.shape
    if split > 1:
        out32.zero_()
    _dot_kernel[(n // bn, split)](x, w, s, out32, n, k, BLOCK_N=bn, BLOCK_K=bk, SPLIT=split,
                                  num_warps=warps, num_stages=stages)


def main() -> None:
    dev = torch.device("cuda")
    torch.manual_seed(0)
    for name, (n, k) in SHAPES.items():
        x = torch.randn(1, k, device=dev, dtype=torch.bfloat16)
        w16 = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(COPIES)]
        q = [quantize_rows(w) for w in w16]
        out = torch.empty(1, n, device=dev, dtype=torch.bfloat16)
        out32 = torch.empty(1, n, device=dev, dtype=torch.float32)
        ref = (x.float() @ (q[0][0].float() * q[0][1][:, None]).t())
        bf16_us = us_per_call(lambda i: gemv(x, w16[i % COPIES], out=out), COPIES, reps=50)
        fp8_us = us_per_call(lambda i: gemv(x, q[i % COPIES][0], out=out, weight_scale=q[i % COPIES][1]),
                             COPIES, reps=50)
        gemv(x, q[0][0], out=out, weight_scale=q[0][1])
        gemv_err = (out.float() - ref).abs().max().item() / ref.abs().max().item()
        print(f"\n{name} {n}x{k}: bf16 GEMV {bf16_us:.2f} us ({n * k * 2 / bf16_us / 1e6:.2f} TB/s), "
              f"FP8 GEMV {fp8_us:.2f} us ({n * k / fp8_us / 1e6:.2f} TB/s, err {gemv_err:.1e})")
        del w16
        for tile in TILES:
            bn, bk, split = tile[:3]
            if n % bn or k % (bk * split):
                continue
            try:
                run(x, q[0][0], q[0][1], out32, tile)
                err = (out32 - ref).abs().max().item() / ref.abs().max().item()
                us = us_per_call(lambda i: run(x, q[i % COPIES][0], q[i % COPIES][1], out32, tile),
                                 COPIES, reps=50)
                print(f"  dot {tile}: {us:6.2f} us {n * k / us / 1e6:4.2f} TB/s err {err:.1e}")
            except Exception as e:   # out of resources, or no such tensor-core shape
                print(f"  dot {tile}: failed ({type(e).__name__}: {str(e)[:120]})")


if __name__ == "__main__":
    main()
