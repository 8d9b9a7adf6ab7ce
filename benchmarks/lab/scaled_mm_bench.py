"""``torch._scaled_mm`` (row-wise scales, as ``fp8_linear`` calls it) on the Llama-3.1-8B
projections at batched-decode and prefill row counts: as called, with
``use_fast_accum=True`` (Hopper's FP8 accumulation without the periodic float32
promotion; vLLM's CUTLASS FP8 kernels use it), and with the operands swapped (weights
as the left operand, so the many weight rows take cuBLAS's M tiles, then the output
transposed back), each against the bf16 ``F.linear``. Errors against a float32 product
of the same quantized operands. Timed inside one CUDA graph over weight copies that
exceed the L2.

    PYTHONPATH=. python3 benchmarks/lab/scaled_mm_bench.py
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from graph_timing import us_per_call

from orbitllm.layers.quantization.fp8_kernels import quantize_per_token, quantize_rows

SHAPES = {"qkv": (6144, 4096), "o_proj": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
ROWS = (64, 128, 256, 8192)


def main() -> None:
    dev = torch.device("cuda")
    torch.manual_seed(0)
    for m in ROWS:
        print(f"\nM = {m}")
        for name, (n, k) in SHAPES.items():
            copies = max(2, min(8, (256 << 20) // (n * k)))
            w16 = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
            q = [quantize_rows(w) for w in w16]
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            xq, xs = quantize_per_token(x)
            ref = (xq.float() * xs) @ (q[0][0].float() * q[0][1][:, None]).t()

            def plain(i, fast=False):
                w, s = q[i % copies]
                return torch._scaled_mm(xq, w.t(), scale_a=xs, scale_b=s.reshape(1, -1),
                                        out_dtype=torch.bfloat16, use_fast_accum=fast)

            def swapped(i):
                w, s = q[i % copies]
                return torch._scaled_mm(w, xq.t(), scale_a=s.reshape(-1, 1), scale_b=xs.reshape(1, -1),
                                        out_dtype=torch.bfloat16).t().contiguous()

            cells = [f"bf16 {us_per_call(lambda i: F.linear(x, w16[i % copies]), copies, reps=20):8.1f}"]
            for label, fn in (("scaled_mm", plain), ("fast_accum", lambda i: plain(i, True)),
                              ("swapped", swapped)):
                try:
                    err = ((fn(0).float() - ref).norm() / ref.norm()).item()
                    cells.append(f"{label} {us_per_call(fn, copies, reps=20):8.1f} (err {err:.0e})")
                except RuntimeError as e:
                    cells.append(f"{label} failed ({str(e)[:80]})")
            print(f"  {name:8} {n}x{k} us: " + "; ".join(cells), flush=True)
            del w16, q


if __name__ == "__main__":
    main()
