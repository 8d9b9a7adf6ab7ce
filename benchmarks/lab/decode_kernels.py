"""Which kernels the engine's steps spend their device time on (torch.profiler; kernels
inside CUDA graphs are traced too): steady decode steps of ``--batch`` requests, or with
``--prefill`` the steps that prefill them (``--prompt-len`` tokens each).

    PYTHONPATH=. python3 benchmarks/lab/decode_kernels.py --model llama3.1-8b --quantization fp8
    PYTHONPATH=. python3 benchmarks/lab/decode_kernels.py --prefill --batch 4 --prompt-len 8000
"""
from __future__ import annotations

import argparse
import random
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from orbitllm import LLM, SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama3.1-8b")
    ap.add_argument("--quantization", default=None)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--prefill", action="store_true")
    ap.add_argument("--kv-cache-dtype", default="auto")
    args = ap.parse_args()
    llm = LLM(args.model, load_format="dummy", quantization=args.quantization,
              enforce_eager=args.enforce_eager, max_model_len=args.prompt_len + 1024,
              kv_cache_dtype=args.kv_cache_dtype)
    eng = llm.engine
    rng = random.Random(0)
    params = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)
    for i in range(args.batch):
        eng.add_request(f"r{i}", {"prompt_token_ids": [rng.randrange(eng.vocab_size) for _ in range(args.prompt_len)]}, params)
    for _ in range(0 if args.prefill else 30):
        eng.step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        if args.prefill:   # until every request has its first token
            args.steps = 0
            while args.steps == 0 or eng.scheduler.waiting or any(r.num_output_tokens == 0 for r in eng.scheduler.running):
                eng.step()
                args.steps += 1
        else:
            for _ in range(args.steps):
                eng.step()
        torch.cuda.synchronize()
    per_kernel: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            k = per_kernel[e.name[:90]]
            k[0] += e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
            k[1] += 1
    total = sum(v[0] for v in per_kernel.values())
    print(f"model {args.model} quantization {args.quantization} kv {args.kv_cache_dtype} "
          f"batch {args.batch} prompt {args.prompt_len} prefill {args.prefill}: "
          f"device time {total / args.steps / 1e3:.3f} ms per step over {args.steps} steps")
    for name, (us, n) in sorted(per_kernel.items(), key=lambda kv: -kv[1][0])[:25]:
        print(f"{us / args.steps:9.1f} us/step {n // args.steps:5d}x  {name}")
    while eng.has_unfinished_requests():
        eng.step()


if __name__ == "__main__":
    main()
