"""One-row projections (batch-1 decode) of Llama-3.1-8B, whole (N=1) and halved (N=2):
cuBLAS (``F.linear``) against the Triton GEMV over a sweep of its configs.

Each variant is timed inside a CUDA graph of back-to-back calls that cycle through
enough copies of the weight (>= 400 MB) that no call reads from L2, as in a model
step where each layer's weights are read once.

    python benchmarks/lab/gemv_bench.py [--quick] [--fp8]

``--fp8``: E4M3 weights with a scale per output row (``quantization="fp8"``), against
``torch._scaled_mm`` in place of cuBLAS's bf16 product.
"""
from __future__ import annotations

import argparse
import itertools

import torch
import torch.nn.functional as F

from graph_timing import us_per_call

from orbitllm.kernels.gemv import GemvConfig, default_gemv_config, gemv

SHAPES = {   # (output rows, input width)
    "qkv N=1": (6144, 4096), "o N=1": (4096, 4096), "gate_up N=1": (28672, 4096), "down N=1": (4096, 14336),
    "qkv N=2": (3072, 4096), "o N=2": (4096, 2048), "gate_up N=2": (14336, 4096), "down N=2": (4096, 7168),
}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="fewer configs")
    p.add_argument("--fp8", action="store_true", help="E4M3 weights, per-row scales")
    args = p.parse_args()
    dev = torch.device("cuda")
    block_ns, block_ks = ((4, 8), (512,)) if args.quick else ((2, 4, 8, 16), (256, 512, 1024))
    if args.fp8:
        block_ks = (512, 1024, 2048, 4096)
    configs = [GemvConfig(bn, bk, 4 if bn * bk <= 4096 else 8, st) for bn, bk, st in
               itertools.product(block_ns, block_ks, (1, 3))]
    print(f"{'shape':12} {'MB':>6} {'cuBLAS us':>9} {'GB/s':>6} {'default us':>10} {'GB/s':>6} "
          f"{'best us':>8} {'GB/s':>6}  best config")
    for name, (n, k) in SHAPES.items():
        mb = n * k * (1 if args.fp8 else 2) / 1e6
        copies = max(4, int(400 / mb))
        ws = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) for _ in range(copies)]
        x = torch.randn(1, k, device=dev, dtype=torch.bfloat16)
        out = torch.empty(1, n, device=dev, dtype=torch.bfloat16)
        scale = None
        if args.fp8:
            from orbitllm.layers.quantization.fp8_kernels import dequantize, quantize_rows, scaled_mm
            ws = [quantize_rows(w) for w in ws]
            scale = ws[0][1]
            ws = [w for w, _ in ws]
            ref = F.linear(x, dequantize(ws[0], scale, torch.bfloat16))
            cublas = us_per_call(lambda i: scaled_mm(x, ws[i], scale, None, None), copies, reps=5)
        else:
            ref = F.linear(x, ws[0])
            cublas = us_per_call(lambda i: torch.mm(x, ws[i].t(), out=out), copies, reps=5)
        results = []
        for cfg in configs + [None]:
            got = gemv(x, ws[0], config=cfg, weight_scale=scale)
            err = ((got.float() - ref.float()).norm() / ref.float().norm()).item()
            assert err < 1e-2, (cfg, err)   # bf16 outputs: a few elements differ by an ulp or two
            t = us_per_call(lambda i, c=cfg: gemv(x, ws[i], out=out, config=c, weight_scale=scale),
                            copies, reps=5)
            results.append((t, cfg or default_gemv_config(n, k), cfg is None))
        default = next(t for t, _, d in results if d)
        best_t, best_cfg, _ = min(results, key=lambda r: r[0])
        gbs = lambda t: mb * 1e3 / t   # noqa: E731  (MB / us = TB/s; x1e3 -> GB/s)
        print(f"{name:12} {mb:6.1f} {cublas:9.2f} {gbs(cublas):6.0f} {default:10.2f} {gbs(default):6.0f} "
              f"{best_t:8.2f} {gbs(best_t):6.0f}  {best_cfg}")
        top = sorted(results, key=lambda r: r[0])[:4]
        print("             top: " + "; ".join(f"{t:.2f} {c.block_n}/{c.block_k}/{c.num_warps}/{c.num_stages}"
                                         for t, c, _ in top))
        ws.clear()
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
