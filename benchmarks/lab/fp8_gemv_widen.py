"""How the FP8 decode GEMV widens its E4M3 weights, timed alone per Llama-3.1-8B shape.

The FP8 GEMV reads half the bytes of the bf16 one but took 0.72x its time. Either
its tiles keep too few bytes in flight, or widening E4M3 to float32 (``.to(tl.float32)``:
a cvt to f16x2, then to f32, per element) is the limit. This lab kernel is the GEMV's
core (no bias, PDL, SiLU or peer send) with three ways to widen:

* ``cvt``: ``w.to(tl.float32)``, what ``kernels/gemv.py`` does;
* ``f16bits``: the byte's sign, exponent and mantissa moved into an f16's bit
  pattern by integer ops (value times 2^-8, subnormals included), then f16 -> f32;
* ``f32bits``: the same into an f32's bit pattern (value times 2^-120), no cvt at all.

The 2^8 / 2^120 go into the row scale. Each variant and tile is checked against a
float32 reference and timed inside one CUDA graph over eight weight copies (more bytes
than the L2 holds); bf16 weights with the GEMV's default tile for the bandwidth to beat.

    PYTHONPATH=. python3 benchmarks/lab/fp8_gemv_widen.py
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from graph_timing import us_per_call

from orbitllm.kernels.gemv import GemvConfig, gemv
from orbitllm.layers.quantization.fp8_kernels import quantize_rows

SHAPES = {"qkv": (6144, 4096), "o_proj": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
TILES = [GemvConfig(*c) for c in ((4, 1024, 4, 3), (4, 2048, 4, 3), (8, 1024, 4, 3), (8, 2048, 4, 2),
                                  (8, 2048, 8, 3), (2, 2048, 4, 3), (16, 512, 4, 2), (4, 4096, 4, 2),
                                  (16, 1024, 8, 2))]
MODES = {"cvt": 0, "f16bits": 1, "f32bits": 2}
FACTOR = {0: 1.0, 1: 2.0 ** 8, 2: 2.0 ** 120}
COPIES = 8


@triton.jit
def _widen(w, MODE: tl.constexpr):
    if MODE == 0:
        return w.to(tl.float32)
    b = w.to(tl.uint32)   # w was loaded as uint8
    if MODE == 1:
        h = ((b & 0x7F) << 7) | ((b & 0x80) << 8)
        return h.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    f = ((b & 0x7F) << 20) | ((b & 0x80) << 24)
    return f.to(tl.float32, bitcast=True)


@triton.jit
def _kernel(x_ptr, w_ptr, s_ptr, out_ptr, N, K, factor, MODE: tl.constexpr,
            BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + rows.to(tl.int64)[:, None] * K + cols[None, :]
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    for k in range(0, K, BLOCK_K):
        x = tl.load(x_ptr + k + cols).to(tl.float32)
        acc += _widen(tl.load(w_ptrs + k), MODE) * x[None, :]
    y = tl.sum(acc, 1) * (tl.load(s_ptr + rows) * factor)
    tl.store(out_ptr + rows, y.to(out_ptr.dtype.element_ty))


def run(x, w, s, out, mode: int, cfg: GemvConfig) -> None:
    n, k = w.shape
    _kernel[(n // cfg.block_n,)](x, w if mode == 0 else w.view(torch.uint8), s, out, n, k,
                                 FACTOR[mode], MODE=mode, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                                 num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def main() -> None:
    dev = torch.device("cuda")
    torch.manual_seed(0)
    for name, (n, k) in SHAPES.items():
        x = torch.randn(1, k, device=dev, dtype=torch.bfloat16)
        w16 = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(COPIES)]
        q = [quantize_rows(w) for w in w16]
        out = torch.empty(1, n, device=dev, dtype=torch.bfloat16)
        ref = (x.float() @ (q[0][0].float() * q[0][1][:, None]).t())
        bf16_us = us_per_call(lambda i: gemv(x, w16[i % COPIES], out=out), COPIES, reps=50)
        fp8_us = us_per_call(lambda i: gemv(x, q[i % COPIES][0], out=out, weight_scale=q[i % COPIES][1]),
                             COPIES, reps=50)
        print(f"\n{name} {n}x{k}: bf16 GEMV {bf16_us:.2f} us ({n * k * 2 / bf16_us / 1e6:.2f} TB/s), "
              f"FP8 GEMV {fp8_us:.2f} us ({n * k / fp8_us / 1e6:.2f} TB/s)")
        del w16
        for cfg in TILES:
            if k % cfg.block_k or n % cfg.block_n:
                continue
            cells = []
            for mode_name, mode in MODES.items():
                try:
                    run(x, q[0][0], q[0][1], out, mode, cfg)
                    err = (out.float() - ref).abs().max().item() / ref.abs().max().item()
                    us = us_per_call(lambda i: run(x, q[i % COPIES][0], q[i % COPIES][1], out, mode, cfg),
                                     COPIES, reps=50)
                    cells.append(f"{mode_name} {us:6.2f} us {n * k / us / 1e6:4.2f} TB/s err {err:.1e}")
                except Exception as e:   # out of resources for a tile
                    cells.append(f"{mode_name} failed ({type(e).__name__})")
            print(f"  {cfg.block_n:2}x{cfg.block_k:4}/{cfg.num_warps}w{cfg.num_stages}s: " + "; ".join(cells))


if __name__ == "__main__":
    main()
