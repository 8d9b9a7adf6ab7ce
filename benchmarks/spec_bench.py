"""Speculative decoding's mechanism, measured apart from acceptance (random weights
accept almost nothing): a benchmark-only proposer replays the target's own greedy
continuation (acceptance near 1).

  (a) verify step of k tokens vs a plain decode step, at batch 1 and 32
  (b) one request, 512-token prompt, 256 new tokens: ms per output token, replay vs none
  (c) n-gram on a nano-like workload (acceptance near 0): throughput vs none

GPU:  python benchmarks/spec_bench.py --model llama3.1-8b --load-format dummy
CPU smoke (tiny sizes; any small model folder, or a shape name with --load-format dummy):
  python benchmarks/spec_bench.py --model qwen3-0.6b --load-format dummy --device cpu \
      --prompt-len 32 --new-tokens 16 --batches 1 2 --nano-requests 4 --nano-max-len 32
"""
from __future__ import annotations

import argparse
import json
import random
import time

import torch

from orbitllm import LLM, SamplingParams
from orbitllm.bench.throughput import BenchRequest, run
from orbitllm.spec.adaptive import AdaptiveDraftLength

_adaptive = AdaptiveDraftLength.update


def _pinned(self: AdaptiveDraftLength, num_proposed: int, num_accepted: int) -> None:
    """The replay measurement's draft length: always k (it measures the mechanism)."""


class ReplayProposer:
    """Proposes the target's recorded greedy continuation of each prompt (for
    benchmarks only: it knows the answer)."""

    def __init__(self, continuations: dict[tuple[int, ...], list[int]]) -> None:
        self.by_len: dict[int, list[tuple[tuple[int, ...], list[int]]]] = {}
        for prompt, cont in continuations.items():
            self.by_len.setdefault(len(prompt), []).append((prompt, cont))

    def propose(self, tokens: list[int], k: int) -> list[int]:
        for n, entries in self.by_len.items():
            head = tuple(tokens[:n])
            for prompt, cont in entries:
                if head == prompt:
                    return cont[len(tokens) - n:len(tokens) - n + k]
        return []


@torch.inference_mode()
def _robust_greedy(llm: LLM) -> None:
    """Random weights give near-tied logits, so a verify step's multi-row products pick
    other greedy tokens than the one-row decode (the replay then accepted 2-5 %). With
    every layer's output projections zeroed the residual stream is the token's embedding
    exactly, and an LM head equal to the embedding makes the token itself win by a wide
    margin: a greedy continuation no rounding changes. The step's work is unchanged
    (the same shapes and kernels; zeros are read like any weight)."""
    model = llm.engine.runner.model
    for name, param in model.named_parameters():
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            param.zero_()
    if getattr(model, "lm_head", None) is not None:
        model.lm_head.weight.copy_(model.embed_tokens.weight)


def _sync(llm: LLM) -> None:
    if llm.engine.runner.device.type == "cuda":
        torch.cuda.synchronize()


def _decode_step_ms(llm: LLM, prompts: list[list[int]], new_tokens: int) -> tuple[float, int]:
    """Mean wall time of the steps after every prompt is in (all rows decoding), and
    the output tokens those steps produced per sequence and step."""
    engine = llm.engine
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(f"b{time.monotonic_ns()}-{i}", {"prompt_token_ids": p}, params,
                           final_only=True)
    while any(r.num_computed_tokens < r.num_prompt_tokens for r in engine.scheduler.running) \
            or engine.scheduler.num_waiting:
        engine.step()
    _sync(llm)
    before = sum(r.num_output_tokens for r in engine.scheduler.running)
    steps, start = 0, time.perf_counter()
    while engine.has_unfinished_requests() and all(
            r.num_output_tokens < new_tokens - 5 for r in engine.scheduler.running):
        engine.step()
        steps += 1
    _sync(llm)
    ms = 1e3 * (time.perf_counter() - start) / max(steps, 1)
    made = sum(r.num_output_tokens for r in engine.scheduler.running) - before
    while engine.has_unfinished_requests():
        engine.step()
    return ms, made / max(steps, 1) / len(prompts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama3.1-8b")
    ap.add_argument("--load-format", default="dummy")
    ap.add_argument("--device", default="auto")
    ap.add_argument("-k", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--nano-requests", type=int, default=256)
    ap.add_argument("--nano-max-len", type=int, default=1024)
    ap.add_argument("--output-json")
    args = ap.parse_args()
    common = dict(load_format=args.load_format, device=args.device,
                  max_num_seqs=max(max(args.batches), args.nano_requests))
    spec_cfg = {"method": "ngram", "num_speculative_tokens": args.k}
    # Two engines share the device: the first takes under half of it (the second's
    # budget is what is free then, less the same headroom).
    plain = LLM(args.model, **common, gpu_memory_utilization=0.45)
    spec = LLM(args.model, **common, speculative_config=spec_cfg)
    vocab = plain.engine.vocab_size
    rng = random.Random(0)
    result: dict = {}

    # (c): n-gram on random prompts (acceptance near 0): throughput vs none.
    lo = min(100, args.nano_max_len)
    reqs = [BenchRequest([rng.randrange(vocab) for _ in range(rng.randint(lo, args.nano_max_len))],
                         rng.randint(lo, args.nano_max_len)) for _ in range(args.nano_requests)]
    run(plain, reqs[:2], 0.0)
    run(spec, reqs[:2], 0.0)
    base = run(plain, reqs, 0.0)
    ngram = run(spec, reqs, 0.0)
    result["nano_ngram"] = {"plain_tok_s": base["output_tok_s"], "ngram_tok_s": ngram["output_tok_s"],
                            "ratio": ngram["output_tok_s"] / base["output_tok_s"],
                            "acceptance_rate": ngram.get("spec_acceptance_rate", 0.0)}

    # (a), (b) on weights whose greedy continuation no rounding changes (see _robust_greedy).
    _robust_greedy(plain)
    _robust_greedy(spec)
    AdaptiveDraftLength.update = _pinned   # every step a full verify step of k drafts
    for bs in sorted(set(args.batches) | {1}):
        prompts = [[rng.randrange(vocab) for _ in range(args.prompt_len)] for _ in range(bs)]
        greedy = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
        conts = [o.outputs[0].token_ids for o in plain.generate(
            [{"prompt_token_ids": p} for p in prompts], greedy, use_tqdm=False)]
        spec.engine.proposer = ReplayProposer({tuple(p): c for p, c in zip(prompts, conts)})
        plain_ms, _ = _decode_step_ms(plain, prompts, args.new_tokens)
        verify_ms, per_step = _decode_step_ms(spec, prompts, args.new_tokens)
        result[f"batch{bs}"] = {"plain_step_ms": plain_ms, "verify_step_ms": verify_ms,
                                "verify_over_plain": verify_ms / plain_ms,
                                "tokens_per_seq_step": per_step}
        if bs == 1:   # (b): ms per output token of one request, replay vs none
            result["single"] = {"plain_ms_per_token": plain_ms,
                                "replay_ms_per_token": verify_ms / per_step}
    AdaptiveDraftLength.update = _adaptive
    print(json.dumps(result, indent=2))
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
