"""Programmatic dependent launch on a stand-in for the decode step of Llama-3.1-8B
at batch 1: per layer the real norm, GEMV and SiLU kernels, and a spin kernel for
what the step does besides (attention; under tensor parallelism, the all-reduce),
each layer with its own weights.

Prints µs per layer (32 layers in one CUDA graph) with PDL off, on without the
GEMV's weight preload, on with it (the default), with the SiLU·mul fused into the
down projection's GEMV (one kernel fewer per layer), and with one empty kernel more
per layer (what a kernel boundary costs); the GEMVs' bandwidth (weights over the
time left after the spin kernels); and checks that all compute the same bits.

    python benchmarks/lab/pdl_bench.py [--spin-us 6]
"""
from __future__ import annotations

import argparse
import dataclasses
import functools

import torch
import triton
import triton.language as tl

from graph_timing import us_per_call

import orbitllm.kernels.gemv as gemv_mod
import orbitllm.kernels.pdl as pdl_mod
from orbitllm.kernels.fused_ops import rms_norm, silu_and_mul
from orbitllm.kernels.gemv import gemv
from orbitllm.kernels.pdl import pdl_args, pdl_enter
from orbitllm.layers.quantization.fp8_kernels import quantize_rows

LAYERS = 32


@triton.jit
def _now(dummy):
    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l,l", [dummy],
                                     dtype=tl.int64, is_pure=False, pack=1)


@triton.jit
def _spin_kernel(ns, PDL: tl.constexpr):
    """One program that holds the stream for ``ns`` nanoseconds and reads no memory."""
    pdl_enter(PDL)
    start = _now(ns)
    while _now(ns) - start < ns:
        pass


def spin(ref: torch.Tensor, us: float) -> None:
    _spin_kernel[(1,)](int(us * 1e3), **pdl_args(ref), num_warps=1)


def layer_chain(tp: int, spin_us: float, dev: torch.device, fp8: bool = False):
    """(step function, weight bytes per layer) for the shapes of one rank of ``tp``,
    with bf16 weights or (``fp8``) E4M3 ones with per-row scales.
    ``step(i, fuse_silu, extra)``: the SiLU·mul in the down GEMV; one empty kernel
    more per layer."""
    h, inter, q, kv = 4096, 14336 // tp, 4096 // tp, 1024 // tp
    bf = dict(device=dev, dtype=torch.bfloat16)
    layers = [dict(qkv=torch.randn(q + 2 * kv, h, **bf) * 0.02, o=torch.randn(h, q, **bf) * 0.02,
                   gate_up=torch.randn(2 * inter, h, **bf) * 0.02, down=torch.randn(h, inter, **bf) * 0.02)
              for _ in range(LAYERS)]
    scales = [dict.fromkeys(w) for w in layers]
    if fp8:
        for w, s in zip(layers, scales):
            for name in w:
                w[name], s[name] = quantize_rows(w[name])
    norm_w = torch.ones(h, **bf)
    x0 = torch.randn(1, h, **bf)

    def step(_: int, fuse_silu: bool = False, extra: bool = False) -> torch.Tensor:
        x, res = x0, torch.zeros_like(x0)
        for w, s in zip(layers, scales):
            if extra:
                spin(x, 0.0)
            if tp == 1:
                xn, res = rms_norm(x, norm_w, 1e-5, res)
            else:   # the fused all-reduce + add + norm: a wait on the peer, then the norm
                spin(x, spin_us)
                xn, res = rms_norm(x, norm_w, 1e-5, res)
            qkv = gemv(xn, w["qkv"], weight_scale=s["qkv"])
            spin(qkv, spin_us)   # rotary + KV write + decode attention + its reduce
            x = gemv(qkv[:, :q], w["o"], weight_scale=s["o"])
            if tp > 1:
                spin(x, spin_us)
            xn, res = rms_norm(x, norm_w, 1e-5, res)
            gate_up = gemv(xn, w["gate_up"], weight_scale=s["gate_up"])
            x = (gemv(gate_up, w["down"], silu_mul=True, weight_scale=s["down"]) if fuse_silu
                 else gemv(silu_and_mul(gate_up), w["down"], weight_scale=s["down"]))
        return x

    per_layer = sum(t.numel() * t.element_size() for t in layers[0].values())
    return step, per_layer


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--spin-us", type=float, default=6.0)
    args = p.parse_args()
    dev = torch.device("cuda")
    print(f"spin {args.spin_us} us per stand-in kernel")
    on, config = pdl_mod._pdl_on, gemv_mod.default_gemv_config
    no_preload = lambda n, k: dataclasses.replace(config(n, k), preload=False)   # noqa: E731
    for tp in (1, 2):
        step, per_layer = layer_chain(tp, args.spin_us, dev)
        spins = (3 if tp > 1 else 1) * args.spin_us
        print(f"\nN={tp}: weights {per_layer / 1e6:.1f} MB per layer, {spins:g} us of spin kernels")
        outs = []
        for name, pdl, preload, fuse, extra in (
                ("PDL off", False, True, False, False), ("PDL, no preload", True, False, False, False),
                ("PDL + preload", True, True, False, False), ("+ fused SiLU", True, True, True, False),
                ("+ empty kernel", True, True, False, True)):
            pdl_mod._pdl_on = on if pdl else (lambda i: False)
            gemv_mod.default_gemv_config = config if preload else no_preload
            fn = functools.partial(step, fuse_silu=fuse, extra=extra)
            us = us_per_call(fn, 1, reps=20) / LAYERS
            outs.append(fn(0).clone())   # eagerly, outside the graph
            print(f"  {name:16} {us:8.2f} us per layer; GEMVs at {per_layer / (us - spins) / 1e6:.2f} TB/s")
        pdl_mod._pdl_on, gemv_mod.default_gemv_config = on, config
        print(f"  all give the same bits: {all(torch.equal(o, outs[0]) for o in outs)}")


if __name__ == "__main__":
    main()
