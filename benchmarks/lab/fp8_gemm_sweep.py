"""The few-row FP8 GEMM (``kernels/fp8_gemm.py``) over its tiles, against
``torch._scaled_mm`` (row-wise scales, fast accumulation, as ``fp8_linear`` calls it),
on the Llama-3.1-8B projections at the row counts of batched decode. Each tile is
checked against ``_scaled_mm`` first; times inside one CUDA graph over weight copies
that exceed the L2. Prints, per row count, each shape's best tile and the step's sum
(the four projections) for cuBLAS, the default tiles (``fp8_gemm_config``'s, or its
fallback where it picks cuBLAS) and the best tiles.

    PYTHONPATH=. python3 benchmarks/lab/fp8_gemm_sweep.py [--rows 8 64 256]
"""
from __future__ import annotations

import argparse

import torch

from graph_timing import us_per_call

from orbitllm.kernels.fp8_gemm import Fp8GemmConfig, fp8_gemm
from orbitllm.layers.quantization.fp8_kernels import quantize_per_token, quantize_rows

SHAPES = {"qkv": (6144, 4096), "o_proj": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
TILES = [Fp8GemmConfig(*c) for c in (
    (16, 64, 128, 4, 4), (16, 64, 256, 4, 3), (16, 128, 128, 4, 4), (32, 64, 128, 4, 4),
    (32, 128, 128, 4, 4), (64, 32, 128, 4, 5), (64, 64, 128, 4, 4), (64, 64, 256, 4, 3),
    (64, 128, 128, 4, 4), (64, 128, 128, 8, 3), (128, 64, 128, 4, 4), (128, 64, 128, 8, 4),
    (128, 128, 128, 8, 3), (128, 128, 64, 4, 4), (64, 256, 128, 8, 3), (128, 256, 128, 8, 3))]


def name(c: Fp8GemmConfig) -> str:
    return f"{c.block_m}x{c.block_n}x{c.block_k}/{c.num_warps}w{c.num_stages}s"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs="+", default=[8, 32, 64, 128, 256, 512])
    args = ap.parse_args()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    weights = {}
    for label, (n, k) in SHAPES.items():
        copies = max(2, min(8, (256 << 20) // (n * k)))
        weights[label] = [quantize_rows(torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02)
                          for _ in range(copies)]
    for m in args.rows:
        sums = {"cublas": 0.0, "default": 0.0, "best": 0.0}
        print(f"\nM = {m}")
        for label, ws in weights.items():
            copies = len(ws)
            x = torch.randn(m, ws[0][0].shape[1], device=dev, dtype=torch.bfloat16)
            xq, xs = quantize_per_token(x)

            def cublas(i):
                w, s = ws[i % copies]
                return torch._scaled_mm(xq, w.t(), scale_a=xs, scale_b=s.reshape(1, -1),
                                        out_dtype=torch.bfloat16, use_fast_accum=True)

            ref = cublas(0).float()
            t_cublas = us_per_call(cublas, copies, reps=20)
            timings = []
            for cfg in [None, *TILES]:
                fn = lambda i, c=cfg: fp8_gemm(xq, xs, *ws[i % copies], config=c)   # noqa: E731
                try:
                    err = ((fn(0).float() - ref).norm() / ref.norm()).item()
                    if err > 1e-2:
                        print(f"  {label} {name(cfg) if cfg else 'default'}: WRONG, rel err {err:.1e}")
                        continue
                    timings.append((us_per_call(fn, copies, reps=20), cfg))
                except Exception as e:   # out of shared memory for a tile
                    print(f"  {label} {name(cfg) if cfg else 'default'}: failed ({type(e).__name__})")
            t_default = next(t for t, c in timings if c is None)
            t_best, best = min(timings, key=lambda tc: tc[0])
            sums["cublas"] += t_cublas
            sums["default"] += t_default
            sums["best"] += t_best
            print(f"  {label:8} cublas {t_cublas:7.1f} us; default {t_default:7.1f}; best {name(best)} "
                  f"{t_best:7.1f}; all: " + ", ".join(f"{name(c) if c else 'default'} {t:.1f}"
                                                   for t, c in timings), flush=True)
        print(f"  sum of the four: " + ", ".join(f"{k} {v:.1f} us" for k, v in sums.items()))


if __name__ == "__main__":
    main()
