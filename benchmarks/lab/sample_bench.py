"""The sampler's draw over a Llama-3 vocabulary (128,256), bf16 logits at temperature 0.6:
the PyTorch exponential race (float copy, scale, softmax, noise, divide, argmax) against
the one-pass Gumbel-max kernel, for 1 and 256 rows.

    python benchmarks/lab/sample_bench.py
"""
from __future__ import annotations

import torch
import triton.testing as tt

from orbitllm.kernels.fused_ops import argmax, gumbel_sample


def main() -> None:
    for rows in (1, 256):
        x = torch.randn(rows, 128256, device="cuda", dtype=torch.bfloat16)
        temp = torch.full((rows,), 0.6, device="cuda")
        seeds = torch.arange(rows, device="cuda")

        def race():
            probs = (x.float() / temp[:, None]).softmax(-1)
            return argmax(probs / torch.empty_like(probs).exponential_())
        us = [1e3 * tt.do_bench(f, warmup=20, rep=200) for f in (race, lambda: gumbel_sample(x, temp, seeds))]
        print(f"{rows} rows: exponential race {us[0]:.1f} us, Gumbel-max kernel {us[1]:.1f} us")


if __name__ == "__main__":
    main()
