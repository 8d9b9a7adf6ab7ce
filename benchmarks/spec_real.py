"""Speculation with real weights on CPU: the default model (SmolLM2-135M-Instruct) on
prompts that quote or edit their input (tests/data/spec_prompts.json), with n-gram
proposals or a draft model (``--draft PATH``; the default model's own .gguf file as its
own draft measures the draft-model machinery at full acceptance). Reports the
acceptance rate, the mean accepted length and the wall-time ratio against plain
decoding, and checks that greedy output is identical.

One engine runs both arms (its proposer switched off for the plain one), in turns, so
that machine load and warm-up fall on both alike; requests go one at a time (the
single-stream case speculation is for).

  PYTHONPATH=. python benchmarks/spec_real.py [--max-tokens 48] [-k 4] [--reps 2] [--draft PATH]
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
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("-k", type=int, default=4)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--draft", default=None, help="a draft model (method draft_model) instead of n-gram")
    args = ap.parse_args()
    convs = [[{"role": "user", "content": p}] for p in json.loads(PROMPTS.read_text())["prompts"]]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)
    spec = ({"method": "ngram"} if args.draft is None else {"method": "draft_model", "model": args.draft})
    llm = LLM(speculative_config={**spec, "num_speculative_tokens": args.k})
    proposer = llm.engine.proposer
    llm.chat(convs[:1], params, use_tqdm=False)   # warm-up
    llm.engine.spec_stats.__init__()
    wall = {"plain": 0.0, "spec": 0.0}
    tokens: dict[str, list] = {}
    for _ in range(args.reps):
        for name in wall:
            llm.engine.proposer = proposer if name == "spec" else None
            start = time.perf_counter()
            outs = [llm.chat([c], params, use_tqdm=False)[0] for c in convs]
            wall[name] += time.perf_counter() - start
            tokens.setdefault(name, [o.outputs[0].token_ids for o in outs])
    stats = llm.engine.spec_stats
    print(json.dumps({
        "method": spec["method"], "prompts": len(convs),
        "greedy_identical": tokens["plain"] == tokens["spec"],
        "acceptance_rate": round(stats.acceptance_rate, 3),
        "mean_accepted_length": round(stats.mean_accepted_length, 3),
        "num_drafts": stats.num_drafts, "accepted_per_pos": stats.accepted_per_pos,
        "output_tokens_per_arm": sum(map(len, tokens["plain"])) * args.reps,
        "wall_s_plain": round(wall["plain"], 2), "wall_s_spec": round(wall["spec"], 2),
        "wall_ratio_spec_over_plain": round(wall["spec"] / wall["plain"], 3)}, indent=2))


if __name__ == "__main__":
    main()
