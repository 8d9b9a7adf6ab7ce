"""n-gram speculation with real weights on CPU: the default model (SmolLM2-135M-Instruct)
on prompts that quote or edit their input (tests/data/spec_prompts.json). Reports the
acceptance rate, the mean accepted length and the wall-time ratio against plain
decoding, and checks that greedy output is identical.

  PYTHONPATH=. python benchmarks/spec_real.py [--max-tokens 64] [-k 4]
"""
from __future__ import annotations

import argparse
import json
import pathlib
import time

from orbitllm import LLM, SamplingParams

PROMPTS = pathlib.Path(__file__).resolve().parent.parent / "tests" / "data" / "spec_prompts.json"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("-k", type=int, default=4)
    args = ap.parse_args()
    prompts = json.loads(PROMPTS.read_text())["prompts"]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)
    convs = [[{"role": "user", "content": p}] for p in prompts]
    rows = {}
    for name, extra in (("plain", {}), ("ngram", {"speculative_config": {
            "method": "ngram", "num_speculative_tokens": args.k}})):
        llm = LLM(**extra)
        llm.chat(convs[:1], params, use_tqdm=False)   # warm-up
        llm.engine.spec_stats.__init__()
        start = time.perf_counter()
        outs = []
        for c in convs:   # one request at a time: the single-stream case speculation is for
            outs += llm.chat([c], params, use_tqdm=False)
        rows[name] = (time.perf_counter() - start, [o.outputs[0].token_ids for o in outs],
                      llm.engine.spec_stats)
    (t0, plain, _), (t1, spec, stats) = rows["plain"], rows["ngram"]
    print(json.dumps({
        "prompts": len(prompts), "greedy_identical": plain == spec,
        "acceptance_rate": round(stats.acceptance_rate, 3),
        "mean_accepted_length": round(stats.mean_accepted_length, 3),
        "accepted_per_pos": stats.accepted_per_pos,
        "wall_s_plain": round(t0, 2), "wall_s_ngram": round(t1, 2),
        "wall_ratio_ngram_over_plain": round(t1 / t0, 3)}, indent=2))


if __name__ == "__main__":
    main()
