"""The QKV projection of a one-row decode step (Llama-8B shapes at N=1 and N=2), timed
in CUDA graphs three ways: the GEMV alone; the GEMV then the rotary + KV write kernel
(the default path); the GEMV with the rotation and KV write in its epilogue
(``RopeWrite``, ``ORBITLLM_ROPE_GEMV=1``).

    python benchmarks/rope_gemv_bench.py
"""
from __future__ import annotations

import torch
import triton.testing as tt

from orbitllm.kernels.gemv import RopeWrite, gemv
from orbitllm.kernels.kv_write import rotary_store_kv_cache


def main() -> None:
    d, bf = "cuda", torch.bfloat16
    for tp in (1, 2):
        hq, hk, D = 32 // tp, 8 // tp, 128
        n = (hq + 2 * hk) * D
        x = torch.randn(1, 4096, device=d, dtype=bf)
        w = torch.randn(n, 4096, device=d, dtype=bf) * 0.02
        cs = torch.randn(4096, D, device=d)
        pos, slot = torch.tensor([700], device=d), torch.tensor([700], device=d)
        kc = torch.zeros(64, 16, hk, D, device=d, dtype=bf)
        vc = torch.zeros_like(kc)

        def two():
            qkv = gemv(x, w)
            q, k, v = (t.view(1, -1, D) for t in qkv.split([hq * D, hk * D, hk * D], -1))
            rotary_store_kv_cache(q, k, v, kc, vc, slot, pos, cs)
        rw = RopeWrite(pos, slot, cs, kc, vc, hq * D)
        us = [1e3 * tt.do_bench_cudagraph(f) for f in (lambda: gemv(x, w), two, lambda: gemv(x, w, rope=rw))]
        print(f"N={tp}, QKV {n} x 4096: GEMV {us[0]:.2f} us, GEMV + rotary/KV-write kernel {us[1]:.2f} us, "
              f"GEMV with the epilogue {us[2]:.2f} us")


if __name__ == "__main__":
    main()
