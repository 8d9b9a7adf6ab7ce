"""Where a single request's decode step goes, with or without tensor parallelism:
wall time per step; on the driver's host, the time spent launching a step and the
time spent waiting for the step before (near zero: the host is the bottleneck);
the driver's device time per step, and the kernels of 30 steps (torch.profiler on
the driver, rank 0): what each adds to the step's critical path, and their totals. With one GPU also the decode graph (the forward without the LM
head and sampling) replayed back to back: the step's device floor.

    python benchmarks/lab/profile_tp.py --model llama3.1-8b --tp 2 --tp-all-reduce peer
"""
from __future__ import annotations

import argparse
import random
import time

import torch
from graph_timing import replay_ms
from torch.profiler import ProfilerActivity, profile

from orbitllm import LLM, SamplingParams


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="llama3.1-8b")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--tp-all-reduce", default="nccl")
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--rows", type=int, default=28, help="kernel table rows")
    args = p.parse_args()
    llm = LLM(args.model, load_format="dummy", max_model_len=2048, tensor_parallel_size=args.tp,
              tp_all_reduce=args.tp_all_reduce)
    eng = llm.engine
    rng = random.Random(0)
    prompt = [rng.randrange(10, eng.vocab_size - 10) for _ in range(args.input_len)]
    eng.add_request("p0", {"prompt_token_ids": prompt},
                    SamplingParams(max_tokens=4 * args.steps + 100, temperature=0, ignore_eos=True),
                    final_only=True)
    for _ in range(10):
        eng.step()
    sync()
    host = {"launch": 0.0, "finish": 0.0}
    timed(eng.runner, "launch", host)
    timed(eng.runner, "finish", host)
    t = time.perf_counter()
    for _ in range(args.steps):
        eng.step()
    sync()
    wall = (time.perf_counter() - t) / args.steps * 1e3
    tag = f"{args.model} tp={args.tp} all_reduce={args.tp_all_reduce}"
    print(f"[{tag}] wall {wall:.3f} ms/step over {args.steps} decode steps; host per step: "
          f"launch {host['launch'] / args.steps:.3f} ms, finish (waits for the step before) "
          f"{host['finish'] / args.steps:.3f} ms")

    graphs = eng.runner.graphs
    if args.tp == 1 and graphs is not None:   # the forward alone, back to back (no host)
        print(f"[{tag}] decode graph replayed alone: {replay_ms(graphs.graphs[(1, 1)], args.steps):.3f} ms")

    steps = 30
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            eng.step()
        sync()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy = sum(e.device_time for e in kernels) / steps / 1e3
    if kernels:
        span = (max(e.time_range.end for e in kernels) - min(e.time_range.start for e in kernels))
        print(f"[{tag}] device kernels: {len(kernels) / steps:.0f} per step, busy {busy:.3f} ms/step, "
              f"span {span / steps / 1e3:.3f} ms/step")
    print(critical_path_table(kernels, steps, args.rows))
    table = prof.key_averages().table(sort_by="self_device_time_total", row_limit=args.rows,
                                      max_name_column_width=70)
    print(table)


def critical_path_table(events, steps: int, rows: int) -> str:
    """Which kernels the step's span is made of. Under PDL a kernel starts before the
    one ahead of it ends, so its duration overstates its cost; here each kernel (in
    start order) is charged only the time by which it pushes the latest end so far
    further out, split into idle time before it starts and the rest ("adds"). Kernels
    are told apart by the kernel before them (the GEMV after the attention's reduce is
    o_proj, the one after a GEMV is down_proj)."""
    totals: dict[str, list[float]] = {}   # kernel <- kernel before: [calls, idle, adds, duration]
    frontier, before = None, "-"
    for e in sorted(events, key=lambda e: e.time_range.start):
        start, end = e.time_range.start, e.time_range.end
        t = totals.setdefault(f"{e.name[:38]} <- {before[:28]}", [0, 0.0, 0.0, 0.0])
        before = e.name
        t[0] += 1
        t[3] += end - start
        if frontier is not None:
            t[1] += max(0.0, start - frontier)
            t[2] += max(0.0, end - max(start, frontier))
        frontier = end if frontier is None else max(frontier, end)
    lines = [f"{'kernel (critical path; us per step)':70} {'calls':>6} {'idle before':>12} "
             f"{'adds':>8} {'mean dur':>9}"]
    for name, (calls, idle, adds, dur) in sorted(totals.items(), key=lambda kv: -(kv[1][1] + kv[1][2]))[:rows]:
        lines.append(f"{name[:70]:70} {calls / steps:6.1f} {idle / steps:12.1f} {adds / steps:8.1f} "
                     f"{dur / calls:9.2f}")
    return "\n".join(lines)


def timed(obj, name: str, totals: dict) -> None:
    """Add the milliseconds each call of ``obj.name`` takes to ``totals[name]``."""
    fn = getattr(obj, name)

    def wrapper(*a, **k):
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            totals[name] += (time.perf_counter() - t) * 1e3
    setattr(obj, name, wrapper)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
