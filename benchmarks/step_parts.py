"""What the parts of a one-request decode step cost on one GPU: the decode graph (the
forward without LM head and sampling) replayed back to back as is, then re-captured
with one part changed at a time: without the attention (the rotary + KV write and the
decode kernels; timing only, the outputs are wrong), with a fixed number of KV splits,
with the SiLU·mul as its own kernel, with PDL off, with the GEMV configs picked alone.

    python benchmarks/step_parts.py [--model llama3.1-8b] [--context 768]
"""
from __future__ import annotations

import argparse
import contextlib
import random

import torch
from graph_timing import replay_ms

import orbitllm.kernels.gemv as gemv_mod
import orbitllm.kernels.paged_attention as pa
import orbitllm.kernels.pdl as pdl
import orbitllm.layers.triton_attention as ta
import orbitllm.models.llama as llama
from orbitllm import LLM, SamplingParams
from orbitllm.kernels.gemv import GemvConfig


def configs_before_call_33(n: int, k: int) -> GemvConfig:
    """The GEMV configs that ``gemv_bench.py`` picked by timing each matrix alone."""
    if n >= 8192:
        return GemvConfig(16, 256, 4, 1)
    if k >= 7168:
        return GemvConfig(16, 1024, 8, 1)
    return GemvConfig(4, 1024 if k >= 4096 else 512, 4, 3)


def recaptured_ms(graphs, reps: int = 100) -> float:
    """The one-row decode graph captured afresh (with what is patched now), timed."""
    graphs.release()
    graphs.capture()
    return replay_ms(graphs.graphs[1], reps)


@contextlib.contextmanager
def patched(obj, name: str, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="llama3.1-8b")
    p.add_argument("--context", type=int, default=768)
    args = p.parse_args()
    llm = LLM(args.model, load_format="dummy", max_model_len=2048, max_num_seqs=1)
    eng = llm.engine
    rng = random.Random(0)
    prompt = [rng.randrange(10, eng.vocab_size - 10) for _ in range(args.context)]
    eng.add_request("p0", {"prompt_token_ids": prompt},
                    SamplingParams(max_tokens=8, temperature=0, ignore_eos=True), final_only=True)
    for _ in range(3):   # the prefill and two decode steps: the graph's buffers hold this request
        eng.step()
    torch.cuda.synchronize()
    graphs = eng.runner.graphs
    base = recaptured_ms(graphs)
    print(f"{args.model}, context {args.context}: decode graph {base:.3f} ms")

    def no_attention(self, q, k, v, k_cache, v_cache, meta, scale, sliding_window, rope=None):
        return q
    variants = {"without attention": patched(ta.TritonAttentionBackend, "forward", no_attention),
                "SiLU·mul as its own kernel": patched(llama, "takes_gemv", lambda x, w: False),
                "PDL off": patched(pdl, "_pdl_on", lambda i: False),
                "GEMV configs before call 33": patched(gemv_mod, "default_gemv_config",
                                                       configs_before_call_33)}
    for splits in (1, 4, 8, 32):
        variants[f"{splits} KV splits"] = patched(
            pa, "choose_num_splits", lambda *a, s=splits, **k: s)
    for name, ctx in variants.items():
        with ctx:
            ms = recaptured_ms(graphs)
        print(f"  {name:28} {ms:.3f} ms ({ms - base:+.3f})")
    print(f"  as is, again                 {recaptured_ms(graphs):.3f} ms")
    llm.shutdown()


if __name__ == "__main__":
    main()
