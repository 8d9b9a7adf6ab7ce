"""Where the `ctx` workload's time goes (peer_bench's: 256 requests, prompts of 2,000-6,000
tokens, 200-500 new tokens; random weights): wall time in steps that prefill against pure
decode steps, the decode batch sizes, preemptions and the KV pool's size, for each KV
cache dtype given (reads engine internals).

    PYTHONPATH=. python3 benchmarks/lab/ctx_split.py --model llama3.1-8b --kv fp8   # one KV dtype per process (auto: the model's)
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import torch

from orbitllm import LLM, SamplingParams


def ctx_requests() -> tuple[list[list[int]], list[int]]:
    rng = random.Random(4)   # peer_bench.py's ctx()
    prompts = [[rng.randint(0, 10000) for _ in range(rng.randint(2000, 6000))] for _ in range(256)]
    return prompts, [rng.randint(200, 500) for _ in range(256)]


def measure(model: str, kv: str) -> dict:
    llm = LLM(model, load_format="dummy", dtype="bfloat16", max_model_len=6656,
              gpu_memory_utilization=0.90, seed=0, kv_cache_dtype=kv)
    eng = llm.engine
    eng.add_request("warm", {"prompt_token_ids": [1, 2, 3, 4]}, SamplingParams(max_tokens=16))
    while eng.has_unfinished_requests():
        eng.step()
    prompts, outs = ctx_requests()
    for i, (p, n) in enumerate(zip(prompts, outs)):
        eng.add_request(f"c{i}", {"prompt_token_ids": p},
                        SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=n), final_only=True)
    torch.cuda.synchronize()
    prefill_s = decode_s = 0.0
    decode_batches, prefill_steps, decode_steps = [], 0, 0
    start = last = time.perf_counter()
    while eng.has_unfinished_requests():
        eng.step()
        now = time.perf_counter()
        sched = eng.last_scheduled.scheduled
        if any(s.num_new_tokens > 1 for s in sched):
            prefill_s += now - last
            prefill_steps += 1
        else:
            decode_s += now - last
            decode_steps += 1
            decode_batches.append(len(sched))
        last = now
    wall = time.perf_counter() - start
    return {"kv_cache_dtype": kv, "kv_blocks": eng.kv.pool.num_blocks,
            "block_size": eng.config.block_size, "wall_s": wall,
            "output_tok_s": sum(outs) / wall, "prefill_steps": prefill_steps, "prefill_s": prefill_s,
            "decode_steps": decode_steps, "decode_s": decode_s,
            "decode_batch_median": statistics.median(decode_batches) if decode_batches else 0,
            "decode_batch_max": max(decode_batches, default=0),
            "decode_ms_per_step": 1e3 * decode_s / max(decode_steps, 1),
            "preemptions": eng.scheduler.num_preemptions}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama3.1-8b")
    ap.add_argument("--kv", default="auto")
    args = ap.parse_args()
    print(json.dumps(measure(args.model, args.kv)), flush=True)


if __name__ == "__main__":
    main()
