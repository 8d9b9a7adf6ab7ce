"""Where n-gram speculation's cost goes when nothing is accepted: the nano workload on a
plain engine and an n-gram engine, counting steps, drains of the overlapped pipeline,
verify steps and the host time of ``_propose`` (wraps engine internals).

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
    """Wraps one engine's ``_drain`` and ``_propose`` (and counts its verify steps)."""

    def __init__(self, engine) -> None:
        self.c = {"drains": 0, "drain_s": 0.0, "propose_s": 0.0, "verify_steps": 0,
                  "draft_tokens": 0, "steps": 0}
        for name, key in (("_drain", "drain_s"), ("_propose", "propose_s")):
            if hasattr(engine, name):
                setattr(engine, name, self._timed(getattr(engine, name), key))
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

    def _timed(self, fn, key):
        def wrapped(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self.c[key] += time.perf_counter() - t
                if key == "drain_s":
                    self.c["drains"] += 1
        return wrapped


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
