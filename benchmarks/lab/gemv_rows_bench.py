"""Few-row projections (a speculative verify step of one request: 1 + k rows) of
Llama-3.1-8B: cuBLAS against the Triton GEMV's two several-row products.

For each shape and row count M it times cuBLAS (``torch.mm``; with ``fp8``
``torch._scaled_mm`` after the per-token quantization of x, as ``fp8_linear`` runs it),
the GEMV's default config, and the best config of each product (``GemvConfig.dot``
False: float32 FMAs on the CUDA cores; True: ``tl.dot`` on the tensor cores), each
inside a CUDA graph of back-to-back calls cycling through enough weight copies
(>= 400 MB) that no call reads from L2. TB/s is the weight's bytes over the time.
The last lines sum a decode step's projections (32 layers of qkv, o, gate_up and
down, plus the LM head) per M against M = 1: the several-row step's cost in weights.

    PYTHONPATH=. python3 benchmarks/lab/gemv_rows_bench.py [--rows 1,2,4,5,8]
        [--dtypes bf16,fp8] [--shapes qkv,o,gate_up,down,lm_head] [--quick] [--reps 5]

``--quick``: each product's default config only, no sweep (about 120 kernels to compile
for both dtypes); the sweep compiles a few hundred per dtype, so run it one dtype a call
(``--dtypes bf16``) to stay inside a device command's 10 minutes.
"""
from __future__ import annotations

import argparse
import itertools
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

SHAPES = {   # (output rows N, input width K)
    "qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
    "lm_head": (128256, 4096),
}
PER_STEP = {"qkv": 32, "o": 32, "gate_up": 32, "down": 32, "lm_head": 1}   # calls per decode step
DTYPES = ("bf16", "fp8")
CYCLED_MB = 400   # weight copies cycled through per timing: far past the H200's 60 MB of L2


def _csv(kind, choices):
    """An argparse type: a comma list of ``kind`` values, each one of ``choices``."""
    def parse(text: str) -> list:
        try:
            items = [kind(t) for t in text.split(",") if t]
        except ValueError:
            items = []
        if not items or any(t not in choices for t in items):
            raise argparse.ArgumentTypeError(f"expected a comma list of {sorted(choices)}, got {text!r}")
        return items
    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=_csv(int, set(range(1, 17))), default=[1, 2, 4, 5, 8],
                   help="row counts M (1..16), comma-separated")
    p.add_argument("--dtypes", type=_csv(str, set(DTYPES)), default=list(DTYPES),
                   help="bf16 weights and/or fp8 (E4M3, a scale per output row)")
    p.add_argument("--shapes", type=_csv(str, set(SHAPES)), default=list(SHAPES))
    p.add_argument("--quick", action="store_true", help="default configs only, no sweep")
    p.add_argument("--reps", type=int, default=5, help="graph replays per timing")
    args = p.parse_args(argv)
    if 1 not in args.rows:
        args.rows = [1] + args.rows   # the baseline of the step sums
    return args


def candidate_configs(rows: int, quick: bool) -> dict[str, list]:
    """The configs timed for ``rows`` rows, by product: ``default`` (what ``gemv`` picks)
    and, from 2 rows, ``fma`` and ``dot``: each product's default tile (the library's
    defaults of its row ranges), then unless ``quick`` a small sweep around it."""
    import triton

    from orbitllm.kernels.gemv import GemvConfig
    if rows == 1:
        return {"default": [None]}
    pad = triton.next_power_of_2(rows)
    fma = [GemvConfig(max(1, 8 // pad), 1024, 4, 3)]
    dot = [GemvConfig(16, 256, 4, 4, dot=True)]
    if not quick:   # float32 tiles of at most 64 registers a thread; tl.dot's stages in 160 KB
        fma += [GemvConfig(bn, bk, 4, st)
                for bn, bk, st in itertools.product((1, 2, 4, 8), (512, 1024), (1, 3))
                if pad * bn * bk // 128 <= 64]
        dot += [GemvConfig(bn, bk, 4, st, dot=True)
                for bn, bk, st in itertools.product((16, 32), (128, 256, 512), (3, 5))
                if (bn + 16) * bk * 2 * st <= 160 * 1024]
    return {"default": [None], "fma": list(dict.fromkeys(fma)), "dot": list(dict.fromkeys(dot))}


@dataclass
class Timed:
    us: float
    config: object


def run(args: argparse.Namespace) -> None:
    from graph_timing import us_per_call

    from orbitllm.kernels.gemv import default_gemv_config, gemv
    from orbitllm.layers.quantization.fp8_kernels import dequantize, quantize_rows, scaled_mm

    dev = torch.device("cuda")
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name(dev)}; rows {args.rows}; "
          f"{'default configs' if args.quick else 'default configs + sweep'}")
    step = {(d, m): 0.0 for d in args.dtypes for m in args.rows}          # best Triton per M
    step_cublas = {(d, m): 0.0 for d in args.dtypes for m in args.rows}
    for dtype in args.dtypes:
        fp8 = dtype == "fp8"
        print(f"\n{dtype}: {'shape':8} {'M':>2} {'MB':>6} {'cuBLAS us':>9} {'TB/s':>5} "
              f"{'default us':>10} {'TB/s':>5} {'fma us':>8} {'TB/s':>5} {'dot us':>8} {'TB/s':>5}  "
              f"vs M=1  best config")
        for name in args.shapes:
            n, k = SHAPES[name]
            mb = n * k * (1 if fp8 else 2) / 1e6
            copies = max(2, int(CYCLED_MB / mb) + 1)
            ws = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) / k ** 0.5 for _ in range(copies)]
            scale = None
            if fp8:
                pairs = [quantize_rows(w) for w in ws]
                ws, scale = [q for q, _ in pairs], pairs[0][1]
                del pairs
                ref_w = dequantize(ws[0], scale, torch.bfloat16)
            else:
                ref_w = ws[0]
            one_row_us = None
            for m in args.rows:
                x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
                out = torch.empty(m, n, device=dev, dtype=torch.bfloat16)
                ref = F.linear(x, ref_w).float()
                if fp8:
                    cublas = us_per_call(lambda i: scaled_mm(x, ws[i], scale, None, None), copies, args.reps)
                else:
                    cublas = us_per_call(lambda i: torch.mm(x, ws[i].t(), out=out), copies, args.reps)
                best: dict[str, Timed] = {}
                for product, configs in candidate_configs(m, args.quick).items():
                    for cfg in configs:
                        got = gemv(x, ws[0], config=cfg, weight_scale=scale).float()
                        err = ((got - ref).norm() / ref.norm()).item()
                        assert err < 2e-2, (name, m, cfg, err)   # bf16 outputs
                        us = us_per_call(lambda i, c=cfg: gemv(x, ws[i], out=out, config=c,
                                                               weight_scale=scale), copies, args.reps)
                        if product not in best or us < best[product].us:
                            best[product] = Timed(us, cfg or default_gemv_config(n, k, m))
                top = min(best.values(), key=lambda t: t.us)
                one_row_us = top.us if m == 1 else one_row_us
                step[dtype, m] += PER_STEP[name] * top.us
                step_cublas[dtype, m] += PER_STEP[name] * cublas
                tbs = lambda us: mb / us   # noqa: E731  (MB / us = TB/s)
                cell = lambda p: (f"{best[p].us:8.2f} {tbs(best[p].us):5.2f}" if p in best   # noqa: E731
                                  else f"{'-':>8} {'-':>5}")
                default = best["default"].us
                print(f"      {name:8} {m:2d} {mb:6.1f} {cublas:9.2f} {tbs(cublas):5.2f} "
                      f"{default:10.2f} {tbs(default):5.2f} {cell('fma')} {cell('dot')}  "
                      f"{top.us / one_row_us:5.2f}x  {top.config}")
            ws.clear()
            del ref_w
            torch.cuda.empty_cache()
    print("\nprojections of a decode step (32 layers + LM head), best Triton config per shape:")
    for dtype in args.dtypes:
        for m in args.rows:
            print(f"  {dtype} M={m}: Triton {step[dtype, m] / 1e3:6.3f} ms "
                  f"({step[dtype, m] / step[dtype, 1]:4.2f}x of M=1), "
                  f"cuBLAS {step_cublas[dtype, m] / 1e3:6.3f} ms")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("gemv_rows_bench.py needs a CUDA GPU")
    run(args)


if __name__ == "__main__":
    main()
