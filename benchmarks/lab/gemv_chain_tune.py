"""GEMV tile configs tried inside the decode step, not alone.

``gemv_bench.py`` picked the GEMV configs by timing each matrix by itself. In the
step, under PDL, a GEMV's programs start while the kernel before it finishes, and
its last programs overlap the next kernel's start, so the config that is fastest
alone need not be fastest in the chain. Here each projection of one rank of
Llama-3.1-8B (N=1 and N=2) gets each candidate config in turn, the others keeping
the default, inside ``pdl_bench.py``'s stand-in step (32 layers, one CUDA graph);
a second pass starts from the first's bests; then every projection's best together,
against the default, twice each.

    python benchmarks/lab/gemv_chain_tune.py [--spin-us 6] [--reps 40] [--fp8] [--tp 1 2]
"""
from __future__ import annotations

import argparse
import functools

import torch

from graph_timing import us_per_call
from pdl_bench import LAYERS, layer_chain

import orbitllm.kernels.gemv as gemv_mod
from orbitllm.kernels.gemv import GemvConfig

CANDIDATES = [GemvConfig(*c) for c in (
    (1, 4096, 4, 2), (2, 1024, 2, 3), (2, 1024, 4, 3), (2, 2048, 4, 3), (4, 512, 4, 3),
    (4, 1024, 4, 2), (4, 1024, 4, 3), (4, 1024, 4, 4), (4, 1024, 8, 3), (4, 2048, 4, 2),
    (4, 2048, 8, 2), (4, 2048, 8, 3), (8, 256, 4, 3), (8, 512, 4, 2), (8, 1024, 4, 3),
    (8, 1024, 8, 1), (8, 1024, 8, 2), (8, 2048, 8, 2), (16, 256, 4, 1), (16, 512, 4, 1),
    (16, 1024, 4, 1), (16, 1024, 8, 1), (16, 1024, 8, 2), (16, 2048, 8, 1), (32, 256, 8, 1),
    (32, 512, 8, 1), (4, 4096, 4, 2), (8, 2048, 4, 3), (8, 4096, 8, 2), (16, 2048, 8, 2))]


def shapes(tp: int) -> dict[str, tuple[int, int]]:
    h, inter, q, kv = 4096, 14336 // tp, 4096 // tp, 1024 // tp
    return {"qkv": (q + 2 * kv, h), "o_proj": (h, q), "gate_up": (2 * inter, h), "down": (h, inter)}


def with_configs(default, chosen: dict[tuple[int, int], GemvConfig]):
    return lambda n, k: chosen.get((n, k)) or default(n, k)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--spin-us", type=float, default=6.0)
    p.add_argument("--reps", type=int, default=40)
    p.add_argument("--fp8", action="store_true", help="E4M3 weights, per-row scales")
    p.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    args = p.parse_args()
    dev = torch.device("cuda")
    name = "default_fp8_gemv_config" if args.fp8 else "default_gemv_config"
    default = getattr(gemv_mod, name)
    for tp in args.tp:
        step, _ = layer_chain(tp, args.spin_us, dev, fp8=args.fp8)
        fn = functools.partial(step, fuse_silu=True)

        def time_with(chosen: dict) -> float:
            setattr(gemv_mod, name, with_configs(default, chosen))
            try:
                return us_per_call(fn, 1, reps=args.reps) / LAYERS
            finally:
                setattr(gemv_mod, name, default)

        base = time_with({})
        print(f"\nN={tp}: default configs {base:.2f} us per layer")
        best: dict[tuple[int, int], GemvConfig] = {}
        for sweep in (1, 2):   # coordinate descent: the second pass starts from the first's bests
            for role, shape in shapes(tp).items():
                timings = []
                for cfg in CANDIDATES:
                    try:
                        timings.append((time_with({**best, shape: cfg}), cfg))
                    except Exception as e:   # e.g. out of resources for this tile
                        print(f"  {role} {cfg}: failed ({type(e).__name__})")
                us, cfg = min(timings, key=lambda t: t[0])
                print(f"  pass {sweep} {role:8} {shape}: best {cfg.block_n}x{cfg.block_k}/"
                      f"{cfg.num_warps}w{cfg.num_stages}s {us:.2f} us; " + ", ".join(
                          f"{c.block_n}x{c.block_k}/{c.num_warps}w{c.num_stages}s {t:.1f}"
                          for t, c in timings))
                best[shape] = cfg
        pairs = [(time_with({}), time_with(best)) for _ in range(2)]
        print(f"  all bests together vs default, twice: " + "; ".join(
            f"{b:.2f} vs {d:.2f}" for d, b in pairs))


if __name__ == "__main__":
    main()
