"""Check and time the Triton kernels on a GPU.

* decode: batch 1/64/256 x context 512..4096 for the Qwen3-0.6B and Llama-3.1-8B
  attention shapes; achieved GB/s of KV bytes read vs a measured device-to-device
  copy (which counts bytes read plus written).
* prefill: one fresh 8k sequence, TFLOP/s (causal FLOPs) vs torch SDPA's flash backend.
* fused ops: Triton vs the eager PyTorch reference vs torch.compile of the reference.

Every kernel is checked against a reference before it is timed (median of
``triton.testing.do_bench``). Small kernels are also timed as replays of a CUDA
graph (as the engine runs decode), over enough copies of the inputs to defeat the
L2 cache, so that Python launch overhead does not hide the GPU time.
``--sweep`` also times decode split counts and alternative prefill tiles.
``--prefill-sweep`` only times the prefill tiles of the Llama-3.1-8B shape, over a wider
set, with a 16-bit and an FP8 (E4M3) cache.
``--split-configs`` only times split decode (small batches) with the default tiles
against the 3-stage, 4-warp-reduce tiles of larger batches.
The table is printed and, if ``OUT`` is set, written to ``$OUT/kernels.txt``.

    python3 benchmarks/lab/kernels_bench.py [--sweep]
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo, when run as a script
from orbitllm.kernels import (  # noqa: E402
    DecodeConfig,
    PrefillConfig,
    apply_rotary_emb,
    apply_rotary_emb_ref,
    paged_decode_attention,
    paged_prefill_attention,
    rms_norm,
    rms_norm_ref,
    silu_and_mul,
    silu_and_mul_ref,
)
from orbitllm.layers.attention import AttentionMetadata, TorchAttentionBackend  # noqa: E402

DEV = torch.device("cuda")
DTYPE = torch.bfloat16
BLOCK_SIZE = 16
SHAPES = {"qwen3-0.6b": (16, 8, 128), "llama3.1-8b": (32, 8, 128)}  # q heads, kv heads, head dim
PREFILL_SHAPES = {**SHAPES, "qwen2.5-0.5b": (14, 2, 64)}
ROTATION_BYTES = 256 << 20  # inputs touched per graph replay: several times the L2

Row = tuple[str, ...]


def median_ms(fn: Callable[[], object]) -> float:
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def graph_ms(calls: list[Callable[[], object]]) -> float:
    """Per-call GPU time of ``calls`` captured in one CUDA graph (no launch overhead)."""
    for call in calls:
        call()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    return median_ms(graph.replay) / len(calls)


def copies_for(nbytes: int, most: int = 128) -> int:
    return max(1, min(most, triton.cdiv(ROTATION_BYTES, nbytes)))


def cfg_name(cfg: PrefillConfig | DecodeConfig | None) -> str:
    if cfg is None:
        return "default"
    tile = f"{cfg.block_rows}x{cfg.block_n}" if isinstance(cfg, PrefillConfig) else f"n{cfg.block_n}"
    return f"{tile}/w{cfg.num_warps}/s{cfg.num_stages}"


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.float(), ref.float()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).norm() / ref.norm()).item()


def check(name: str, err: float, tol: float = 1e-2) -> str:
    if err >= tol:
        print(f"CHECK FAILED {name}: rel err {err:.2e}", file=sys.stderr)
    return f"{err:.1e}" + ("" if err < tol else " FAIL")


def copy_bandwidth_gbs() -> float:
    """Device-to-device copy of 1 GiB, counting bytes read plus bytes written."""
    src = torch.randn(1 << 28, device=DEV)
    dst = torch.empty_like(src)
    return 2 * src.numel() * src.element_size() / median_ms(lambda: dst.copy_(src)) / 1e6


# ----------------------------------------------------------------------------- decode


def decode_case(batch: int, ctx: int, hq: int, hkv: int, d: int):
    """Random bf16 paged cache holding ``batch`` sequences of ``ctx`` tokens, scattered blocks."""
    blocks = triton.cdiv(ctx, BLOCK_SIZE)
    k_cache = torch.randn(batch * blocks, BLOCK_SIZE, hkv, d, device=DEV, dtype=DTYPE)
    v_cache = torch.randn_like(k_cache)
    block_tables = torch.randperm(batch * blocks, device=DEV, dtype=torch.int32).view(batch, blocks)
    q = torch.randn(batch, hq, d, device=DEV, dtype=DTYPE)
    meta = AttentionMetadata(
        slot_mapping=torch.full((batch,), -1, dtype=torch.int64, device=DEV),
        query_start_loc=torch.arange(batch + 1, dtype=torch.int32, device=DEV),
        seq_lens=torch.full((batch,), ctx, dtype=torch.int32, device=DEV),
        block_tables=block_tables, max_query_len=1, max_seq_len=ctx,
        query_start_loc_cpu=list(range(batch + 1)), seq_lens_cpu=[ctx] * batch)
    return q, k_cache, v_cache, meta


def run_decode(q, k_cache, v_cache, meta, config: DecodeConfig | None = None,
               num_splits: int | None = None) -> torch.Tensor:
    return paged_decode_attention(q, k_cache, v_cache, meta.query_start_loc, meta.seq_lens,
                                  meta.block_tables, meta.max_seq_len, q.shape[-1] ** -0.5,
                                  num_splits=num_splits, config=config)


def decode_reference(q, k_cache, v_cache, meta) -> torch.Tensor:
    empty = q.new_empty(0, k_cache.shape[2], q.shape[-1])
    meta.slot_mapping = meta.slot_mapping[:0]
    return TorchAttentionBackend().forward(q, empty, empty, k_cache, v_cache, meta, q.shape[-1] ** -0.5, None)


def bench_decode(copy_gbs: float) -> list[Row]:
    rows = []
    for model, (hq, hkv, d) in SHAPES.items():
        for batch in (1, 64, 256):
            for ctx in (512, 1024, 2048, 4096):
                kv_bytes = 2 * batch * ctx * hkv * d * DTYPE.itemsize
                cases = [decode_case(batch, ctx, hq, hkv, d) for _ in range(copies_for(kv_bytes))]
                err = rel_err(run_decode(*cases[0]), decode_reference(*cases[0]))
                eager_ms = median_ms(lambda: run_decode(*cases[0]))
                ms = graph_ms([lambda c=c: run_decode(*c) for c in cases])
                gbs = kv_bytes / ms / 1e6
                rows.append((model, str(batch), str(ctx), f"{ms * 1e3:.1f}", f"{gbs:.0f}",
                             f"{100 * gbs / copy_gbs:.0f}%", f"{eager_ms * 1e3:.1f}",
                             check(f"decode {model} {batch}x{ctx}", err)))
    return rows


def sweep_decode_splits() -> list[Row]:
    """Batch 1, where split-KV matters most: GPU time by split count (default tiles)."""
    rows = []
    hq, hkv, d = SHAPES["llama3.1-8b"]
    for ctx in (4096, 16384):
        kv_bytes = 2 * ctx * hkv * d * DTYPE.itemsize
        cases = [decode_case(1, ctx, hq, hkv, d) for _ in range(copies_for(kv_bytes))]
        for splits in (None, 1, 2, 4, 8, 16, 32, 64):
            ms = graph_ms([lambda c=c: run_decode(*c, num_splits=splits) for c in cases])
            rows.append((f"1x{ctx}", str(splits or "auto"), f"{ms * 1e3:.1f}", f"{kv_bytes / ms / 1e6:.0f}"))
    return rows


def split_configs() -> list[Row]:
    """Small batches, where the context is split: the default split tiles against the
    3-stage tiles (and 4-warp reduce) that larger batches use, for Llama-8B's heads and
    their half under two-way tensor parallelism."""
    rows = []
    for name, hq, hkv in (("llama3.1-8b", 32, 8), ("llama3.1-8b/2", 16, 4)):
        for batch in (1, 4, 16):
            for ctx in (768, 4096, 16384):
                kv_bytes = 2 * batch * ctx * hkv * 128 * DTYPE.itemsize
                cases = [decode_case(batch, ctx, hq, hkv, 128) for _ in range(copies_for(kv_bytes))]
                err = rel_err(run_decode(*cases[0]), decode_reference(*cases[0]))
                new = graph_ms([lambda c=c: run_decode(*c) for c in cases])
                old = graph_ms([lambda c=c: run_decode(*c, config=DecodeConfig(64, 4, 3)) for c in cases])
                rows.append((name, str(batch), str(ctx), f"{new * 1e3:.1f}", f"{old * 1e3:.1f}",
                             check(f"decode {name} {batch}x{ctx}", err)))
    return rows


# ----------------------------------------------------------------------------- prefill


def prefill_case(n: int, hq: int, hkv: int, d: int):
    """One fresh ``n``-token sequence whose K/V are already in a scattered paged cache."""
    blocks = triton.cdiv(n, BLOCK_SIZE)
    q = torch.randn(n, hq, d, device=DEV, dtype=DTYPE)
    k = torch.randn(n, hkv, d, device=DEV, dtype=DTYPE)
    v = torch.randn_like(k)
    table = torch.randperm(blocks, device=DEV, dtype=torch.int32)
    k_cache = torch.empty(blocks, BLOCK_SIZE, hkv, d, device=DEV, dtype=DTYPE)
    v_cache = torch.empty_like(k_cache)
    pos = torch.arange(n, device=DEV)
    slots = table[pos // BLOCK_SIZE].long() * BLOCK_SIZE + pos % BLOCK_SIZE
    k_cache.view(-1, hkv, d)[slots] = k
    v_cache.view(-1, hkv, d)[slots] = v
    return q, k, v, k_cache, v_cache, table[None]


WIDE_PREFILL_SWEEP = [PrefillConfig(r, bn, w, st) for r in (128, 256) for bn in (32, 64, 128)
                      for w in (4, 8) for st in (2, 3)]


def bench_prefill(n: int, sweep: bool, wide: bool = False, fp8_cache: bool = False) -> list[Row]:
    rows = []
    configs = [None]
    if sweep:
        configs += [PrefillConfig(128, 64, 4, 3), PrefillConfig(128, 128, 8, 3), PrefillConfig(256, 64, 8, 3)]
    if wide:
        configs += WIDE_PREFILL_SWEEP
    shapes = {"llama3.1-8b": PREFILL_SHAPES["llama3.1-8b"]} if wide else PREFILL_SHAPES
    for model, (hq, hkv, d) in shapes.items():
        q, k, v, kc, vc, table = prefill_case(n, hq, hkv, d)
        if fp8_cache:
            kc, vc = kc.to(torch.float8_e4m3fn), vc.to(torch.float8_e4m3fn)
            model += " fp8 KV"
        qsl = torch.tensor([0, n], dtype=torch.int32, device=DEV)
        lens = torch.tensor([n], dtype=torch.int32, device=DEV)
        qt, kt, vt = (x.transpose(0, 1)[None] for x in (q, k.repeat_interleave(hq // hkv, 1),
                                                         v.repeat_interleave(hq // hkv, 1)))
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
            sdpa = lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)  # noqa: E731
            ref = sdpa()[0].transpose(0, 1)
            sdpa_ms = median_ms(sdpa)
        flops = 2 * 2 * hq * d * n * n / 2
        for cfg in configs:
            run = lambda: paged_prefill_attention(q, kc, vc, qsl, lens, table, n, d ** -0.5, config=cfg)  # noqa: E731
            try:
                err = rel_err(run(), ref)
            except Exception as e:   # out of shared memory for this tile
                rows.append((model, str(n), cfg_name(cfg), "failed", type(e).__name__, "", "", ""))
                continue
            ms = median_ms(run)
            rows.append((model, str(n), cfg_name(cfg), f"{ms:.3f}", f"{flops / ms / 1e9:.0f}",
                         f"{sdpa_ms:.3f}", f"{flops / sdpa_ms / 1e9:.0f}", check(f"prefill {model} {cfg}", err)))
    return rows


# ----------------------------------------------------------------------------- fused ops


def fused_cases(tokens: int) -> list[tuple[str, Callable, Callable, Callable[[], tuple], int]]:
    """(name, Triton op, reference, fresh-argument factory, bytes moved) at Llama-8B sizes."""
    hidden, inter, hq, hkv, d = 4096, 14336, 32, 8, 128
    w = torch.randn(hidden, device=DEV, dtype=DTYPE)
    inv_freq = 1.0 / 500000.0 ** (torch.arange(0, d, 2, device=DEV).float() / d)
    freqs = torch.outer(torch.arange(8192, device=DEV).float(), inv_freq)
    cache = torch.cat([freqs.cos(), freqs.sin()], -1)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=DEV, dtype=DTYPE)

    return [
        ("rms_norm+residual", rms_norm, rms_norm_ref,
         lambda: (rand(tokens, hidden), w, 1e-6, rand(tokens, hidden)), 4 * tokens * hidden * 2),
        ("silu_and_mul", silu_and_mul, silu_and_mul_ref,
         lambda: (rand(tokens, 2 * inter),), 3 * tokens * inter * 2),
        ("rotary q+k", apply_rotary_emb, apply_rotary_emb_ref,
         lambda: (rand(tokens, hq, d), rand(tokens, hkv, d),
                  torch.randint(0, 8192, (tokens,), device=DEV), cache), 2 * tokens * (hq + hkv) * d * 2),
    ]


def bench_fused_ops() -> list[Row]:
    rows = []
    for tokens in (64, 4096):
        for name, op, ref_fn, make_args, nbytes in fused_cases(tokens):
            compiled = torch.compile(ref_fn, dynamic=False)
            err = fused_error(name, op, ref_fn, compiled, make_args())
            arg_sets = [make_args() for _ in range(copies_for(nbytes, most=64))]
            times = {label: graph_ms([lambda f=f, a=a: f(*a) for a in arg_sets])
                     for label, f in (("triton", op), ("eager", ref_fn), ("compile", compiled))}
            rows.append((name, str(tokens), f"{times['triton'] * 1e3:.1f}",
                         f"{nbytes / times['triton'] / 1e6:.0f}", f"{times['eager'] * 1e3:.1f}",
                         f"{times['compile'] * 1e3:.1f}", min(times, key=times.get), err))
    return rows


def fused_error(name: str, op, ref_fn, compiled, args: tuple) -> str:
    """Triton and compiled outputs vs eager; the Triton op runs on copies (rotary is in place)."""
    ref, comp = ref_fn(*args), compiled(*args)
    mine = tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)
    out = op(*mine)
    if out is None:  # rotary: q and k were rotated in place
        out = mine[:2]
    as_tuple = lambda t: t if isinstance(t, tuple) else (t,)  # noqa: E731
    err = max(rel_err(o, r) for o, r in zip(as_tuple(out) + as_tuple(comp), as_tuple(ref) * 2))
    return check(name, err)


# ----------------------------------------------------------------------------- report


def table(title: str, header: Row, rows: list[Row]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = lambda r: "  ".join(c.rjust(w) for c, w in zip(r, widths))  # noqa: E731
    return "\n".join([f"== {title}", fmt(header), *map(fmt, rows), ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sweep", action="store_true", help="also time alternative tile configs")
    parser.add_argument("--split-configs", action="store_true", help="only the split decode tiles")
    parser.add_argument("--prefill-sweep", action="store_true", help="only a wide prefill tile sweep")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.prefill_sweep:
        for fp8_cache in (False, True):
            print(table(f"prefill tiles, one fresh sequence, causal (fp8 cache {fp8_cache})", (
                "model", "tokens", "config", "ms", "TFLOP/s", "sdpa ms", "sdpa TFLOP/s", "rel err"),
                bench_prefill(8192, False, wide=True, fp8_cache=fp8_cache)), flush=True)
        return
    if args.split_configs:
        print(table("split decode: default tiles against (64, 4, 3) (graph replay)", (
            "heads", "batch", "ctx", "us", "us (64, 4, 3)", "rel err"), split_configs()))
        return
    props = torch.cuda.get_device_properties(DEV)
    copy_gbs = copy_bandwidth_gbs()
    parts = [f"device: {props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}, "
             f"triton {triton.__version__}; d2d copy {copy_gbs:.0f} GB/s (read+write)\n"]
    parts.append(table("decode (bf16, block 16): GPU time from graph replay, KV GB/s vs copy", (
        "model", "batch", "ctx", "us", "GB/s", "of copy", "us eager", "rel err"), bench_decode(copy_gbs)))
    print(parts[-1], flush=True)
    parts.append(table("prefill, one fresh sequence, causal (bf16)", (
        "model", "tokens", "config", "ms", "TFLOP/s", "sdpa ms", "sdpa TFLOP/s", "rel err"),
        bench_prefill(8192, args.sweep)))
    print(parts[-1], flush=True)
    parts.append(table("fused ops (bf16, Llama-8B sizes; graph replay; rotary ref is out of place)", (
        "op", "tokens", "triton us", "triton GB/s", "eager us", "compile us", "fastest", "rel err"),
        bench_fused_ops()))
    print(parts[-1], flush=True)
    if args.sweep:
        parts.append(table("decode split-KV sweep, batch 1 (llama3.1-8b, graph replay)",
                           ("case", "splits", "us", "GB/s"), sweep_decode_splits()))
        print(parts[-1], flush=True)
    report = "\n".join(parts)
    print("\n" + report)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "kernels.txt"), "w") as f:
            f.write(report)


if __name__ == "__main__":
    main()
