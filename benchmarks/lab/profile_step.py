"""Where a step's host time goes: cProfile over steady-state steps of the throughput
workload (random weights), plus the mean wall time per step.

    python benchmarks/lab/profile_step.py --model qwen3-0.6b --num-prompts 256 --steps 200
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import random
import time

from orbitllm import LLM, SamplingParams


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="qwen3-0.6b")
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--no-overlap", action="store_true")
    args = p.parse_args()
    llm = LLM(args.model, load_format="dummy", max_model_len=2048,
              async_scheduling=not args.no_overlap)
    eng = llm.engine
    rng = random.Random(0)
    vocab = eng.vocab_size
    for i in range(args.num_prompts):
        eng.add_request(f"p{i}", {"prompt_token_ids": [rng.randrange(10, vocab - 10) for _ in range(rng.randint(100, 1024))]},
                        SamplingParams(max_tokens=1024, temperature=0.6, ignore_eos=True), final_only=True)
    while eng.scheduler.num_waiting or any(r.num_output_tokens == 0 for r in eng.scheduler.running):
        eng.step()   # until every prompt is prefilled
    for _ in range(5):
        eng.step()
    gpu_ms = _time_gpu(eng, args.steps)
    prof = cProfile.Profile()
    t = time.perf_counter()
    prof.enable()
    for _ in range(args.steps):
        eng.step()
    prof.disable()
    dt = (time.perf_counter() - t) / args.steps
    print(f"steady decode, {eng.scheduler.num_running} running: {dt * 1e3:.2f} ms/step "
          f"(overlap {'off' if args.no_overlap else 'on'}); device time {gpu_ms:.2f} ms/step")
    pstats.Stats(prof).sort_stats("tottime").print_stats(22)


def _time_gpu(eng, steps: int) -> float:
    """Mean device time of a step's launched work, from CUDA events around each launch
    (a start event runs only once the device reaches it, so queueing is excluded)."""
    import torch
    runner = eng.runner
    launch = runner.launch
    pairs = []

    def timed(*a, **k):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = launch(*a, **k)
        end.record()
        pairs.append((start, end))
        return out

    runner.launch = timed
    t = time.perf_counter()
    for _ in range(steps):
        eng.step()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t) / steps
    runner.launch = launch
    print(f"without profiler: {wall * 1e3:.2f} ms/step wall")
    return sum(s.elapsed_time(e) for s, e in pairs) / len(pairs)


if __name__ == "__main__":
    main()
