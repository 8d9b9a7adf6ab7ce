"""Does structured output slow the requests that do not use it?

Two runs of the same batch on one engine: in the first every request is free text; in the
second half of them are constrained by a JSON schema (xgrammar masks on the device). The
figure is the free requests' TPOT (time per output token after the first) in each run;
the issue's bar is the mixed run within 5% of the free one. Runs on CPU and GPU:

    PYTHONPATH=. python benchmarks/structured_bench.py [--model PATH] [--num-requests 16] [--max-tokens 64]
                                          [--device cpu|cuda] [--repeats 3] [--out result.json]
                                          [--load-format dummy --tokenizer DIR]

On the device, where the default model's package is absent, the default model's shape with
random weights: ``--model DIR/config.json --load-format dummy --tokenizer DIR`` (a folder
holding its config.json and tokenizer files).

Free requests ignore EOS so every run computes the same tokens; constrained ones generate
a long JSON array (so they stay in the batch) and may end early when their grammar does.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

SCHEMA = {"type": "object", "properties": {
    "items": {"type": "array", "minItems": 200, "items": {"type": "object", "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 999},
        "kind": {"enum": ["alpha", "beta", "gamma"]}}, "required": ["id", "kind"]}}},
    "required": ["items"]}


def run_batch(llm, prompts: list[str], constrained: list[bool], max_tokens: int) -> list[float]:
    """The free requests' TPOTs (seconds per token) when the batch runs together."""
    from orbitllm import SamplingParams
    from orbitllm.sampling_params import StructuredOutputsParams
    engine = llm.engine
    free_ids = set()
    for i, (prompt, c) in enumerate(zip(prompts, constrained)):
        if c:
            params = SamplingParams(temperature=1.0, seed=i, max_tokens=max_tokens,
                                    structured_outputs=StructuredOutputsParams(json=SCHEMA))
        else:
            params = SamplingParams(temperature=1.0, seed=i, max_tokens=max_tokens, ignore_eos=True)
            free_ids.add(f"b{i}")
        engine.add_request(f"b{i}", prompt, params)
    first: dict[str, float] = {}
    tpots = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            now = time.perf_counter()
            if out.request_id not in free_ids:
                continue
            n = len(out.outputs[0].token_ids)
            if n >= 1 and out.request_id not in first:
                first[out.request_id] = (now, n)
            if out.finished:
                t0, n0 = first[out.request_id]
                if n > n0:
                    tpots.append((now - t0) / (n - n0))
    return tpots


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model path (default: the built-in default model)")
    parser.add_argument("--num-requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--device", default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None, help="write the result as JSON here")
    parser.add_argument("--load-format", default=None, help="dummy: random weights")
    parser.add_argument("--tokenizer", default=None)
    args = parser.parse_args()
    from orbitllm import LLM
    from orbitllm.sampling_params import StructuredOutputsParams
    kwargs = {k: v for k, v in (("device", args.device), ("load_format", args.load_format),
                                ("tokenizer", args.tokenizer)) if v}
    llm = LLM(args.model, **kwargs)
    prompts = [f"Request {i}: list the items of the inventory as JSON." for i in range(args.num_requests)]
    half = [i % 2 == 1 for i in range(args.num_requests)]
    none = [False] * args.num_requests
    llm.engine.structured.compile(StructuredOutputsParams(json=SCHEMA))   # outside the timing
    run_batch(llm, prompts[:4], [False, True, False, True], 8)            # warm-up
    free_runs, mixed_runs = [], []
    for _ in range(args.repeats):   # interleaved, so drift hits both alike
        free_runs.append(statistics.median(run_batch(llm, prompts, none, args.max_tokens)))
        mixed_runs.append(statistics.median(run_batch(llm, prompts, half, args.max_tokens)))
    free, mixed = statistics.median(free_runs), statistics.median(mixed_runs)
    result = {"device": str(llm.engine.runner.device), "num_requests": args.num_requests,
              "max_tokens": args.max_tokens, "free_tpot_ms": round(free * 1e3, 3),
              "mixed_free_tpot_ms": round(mixed * 1e3, 3),
              "slowdown_pct": round((mixed / free - 1) * 100, 2),
              "free_runs_ms": [round(x * 1e3, 3) for x in free_runs],
              "mixed_runs_ms": [round(x * 1e3, 3) for x in mixed_runs]}
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
