"""Where n-gram speculation's cost goes when nothing is accepted: the nano workload on a
plain engine and an n-gram engine, counting steps, verify steps, draft tokens and the
time in ``_propose`` (with the drains it starts, which wait for the device; wraps engine
internals).

    PYTHONPATH=. python3 benchmarks/lab/spec_overhead.py --model llama3.1-8b
"""
from __future__ import annotations

import argparse
import json
import random
import time

from orbitllm import LLM
from orbitllm.bench.throughput import BenchRequest, run


class Counters:
    """Wraps one engine's ``_propose`` and ``step`` (the verify steps among them)."""

    def __init__(self, engine) -> None:
        self.c = {"propose_s": 0.0, "verify_steps": 0, "draft_tokens": 0, "steps": 0}
        propose = engine._propose

        def timed():
            t = time.perf_counter()
            try:
                return propose()
            finally:
                self.c["propose_s"] += time.perf_counter() - t
        engine._propose = timed
        step = engine.step

        def counted():
            out = step()
            self.c["steps"] += 1
            drafts = engine.last_scheduled.drafts
            if drafts:
                self.c["verify_steps"] += 1
                self.c["draft_tokens"] += sum(len(d) for d in drafts.values())
            return out
        engine.step = counted


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama3.1-8b")
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--max-len", type=int, default=1024)
    args = ap.parse_args()
    common = dict(load_format="dummy", max_num_seqs=args.requests)
    plain = LLM(args.model, **common, gpu_memory_utilization=0.45)
    spec = LLM(args.model, **common, speculative_config={"method": "ngram", "num_speculative_tokens": 4})
    rng = random.Random(0)
    vocab = plain.engine.vocab_size
    lo = min(100, args.max_len)
    reqs = [BenchRequest([rng.randrange(vocab) for _ in range(rng.randint(lo, args.max_len))],
                         rng.randint(lo, args.max_len)) for _ in range(args.requests)]
    result = {}
    for name, llm in (("plain", plain), ("ngram", spec)):
        run(llm, reqs[:2], 0.0)
        counters = Counters(llm.engine)
        r = run(llm, reqs, 0.0)
        result[name] = {"output_tok_s": r["output_tok_s"], "wall_s": r.get("elapsed_s", r.get("wall_s")),
                        **{k: round(v, 4) if isinstance(v, float) else v for k, v in counters.c.items()}}
    result["ratio"] = result["ngram"]["output_tok_s"] / result["plain"]["output_tok_s"]
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
