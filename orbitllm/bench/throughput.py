"""Offline throughput benchmark (``orbitllm bench throughput``).

Default workload (nano-vllm's): 256 requests, prompt and output lengths each
uniform in [100, 1024], random token ids, seed 0, EOS ignored. Reports output
and total tokens/s, requests/s, wall time, peak KV usage, and the fraction of
the memory-bandwidth floor reached: every step must at least read the weights
once and the KV of every scheduled sequence's context, at the measured
device-to-device copy bandwidth. The roofline floor also counts compute: each step
takes at least the longer of its reads and its matmul FLOPs at the measured matmul
rate, which matters where prefill dominates (long prompts, large models).
"""
from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import asdict, dataclass, replace

import torch


@dataclass
class BenchRequest:
    prompt_token_ids: list[int]
    output_len: int


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num-prompts", type=int, default=256)
    parser.add_argument("--input-len", type=int, default=None, help="fixed prompt length")
    parser.add_argument("--output-len", type=int, default=None, help="fixed output length")
    parser.add_argument("--min-len", type=int, default=100, help="random lengths: lower bound")
    parser.add_argument("--max-len", type=int, default=1024, help="random lengths: upper bound")
    parser.add_argument("--dataset", default=None, help="JSONL file with a 'prompt' per line")
    parser.add_argument("--temperature", type=float, default=0.6)
    parser.add_argument("--random-weights", action="store_true",
                        help="random weights with the model's shapes (qwen3-0.6b, llama3.1-8b, llama3.1-70b, llama3.2-1b, a config.json)")
    parser.add_argument("--output-json", default=None)


def make_requests(args, vocab_size: int, tokenizer) -> list[BenchRequest]:
    rng = random.Random(args.seed)

    def length(fixed: int | None) -> int:
        return fixed if fixed is not None else rng.randint(args.min_len, args.max_len)

    if args.dataset:
        if tokenizer is None:
            raise ValueError("dataset: prompts from a file need a tokenizer (--tokenizer)")
        with open(args.dataset) as f:
            texts = [json.loads(line)["prompt"] for line in f if line.strip()]
        return [BenchRequest(tokenizer.encode(texts[i % len(texts)]), length(args.output_len))
                for i in range(args.num_prompts)]
    out = []
    for _ in range(args.num_prompts):
        n = length(args.input_len)
        out.append(BenchRequest([rng.randrange(10, vocab_size - 10) for _ in range(n)],
                                length(args.output_len)))
    return out


def copy_bandwidth(device: torch.device) -> float:
    """Bytes/s of a large device-to-device copy, counting bytes read plus written."""
    n = (1 << 30) if device.type == "cuda" else (1 << 27)
    src = torch.empty(n, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    reps = 20 if device.type == "cuda" else 5
    return _rate(lambda: dst.copy_(src), 2 * n, warmup=3, reps=reps, device=device)


def matmul_rate(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of a large square matmul in the model's dtype (the compute ceiling)."""
    n, reps = (8192, 10) if device.type == "cuda" else (512, 3)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    return _rate(lambda: a @ b, 2 * n ** 3, warmup=2, reps=reps, device=device)


def _rate(fn, work: float, warmup: int, reps: int, device: torch.device) -> float:
    """``work`` (bytes, FLOPs) per second of ``fn()``, timed over ``reps`` calls after
    ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    _sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    _sync(device)
    return work * reps / (time.perf_counter() - t)


@dataclass
class StepFlops:
    """Matmul FLOPs of one step on one rank, from the rank's own weights (so a
    tensor-parallel shard counts its part): dense layers per token, causal attention
    per (query, key) pair, and the LM head once per scheduled sequence (an upper bound:
    a partial prefill chunk samples nothing)."""

    dense_per_token: float
    attn_per_pair: float
    head_per_row: float

    @classmethod
    def of(cls, model) -> "StepFlops":
        dense = sum(p.numel() for p in model.layers.parameters() if p.dim() == 2)
        head = model.embed_tokens.weight if model.lm_head is None else model.lm_head.weight
        q_dim = model.layers[0].self_attn.q_size
        # QK^T and PV: 2 FLOPs per multiply-add each, per layer.
        return cls(2 * dense, 4 * q_dim * len(model.layers), 2 * head.numel())

    def step(self, scheduled) -> float:
        total = 0.0
        for s in scheduled:
            start, new = s.num_computed_tokens, s.num_new_tokens
            # query i of the chunk (position start + i) sees start + i + 1 keys
            pairs = new * start + new * (new + 1) / 2
            total += self.dense_per_token * new + self.attn_per_pair * pairs + self.head_per_row
        return total


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(llm, requests: list[BenchRequest], temperature: float) -> dict:
    from orbitllm import SamplingParams
    engine = llm.engine
    runner = engine.runner
    weight_bytes = sum(p.numel() * p.element_size() for p in runner.model.parameters())
    kv_token_bytes = runner.kv_bytes_per_block(runner.model, 1, runner.kv_cache.dtype)
    bw = copy_bandwidth(runner.device)
    rate = matmul_rate(runner.device, runner.dtype)
    flops = StepFlops.of(runner.model)
    for i, r in enumerate(requests):
        engine.add_request(f"bench-{i}", {"prompt_token_ids": r.prompt_token_ids},
                           SamplingParams(max_tokens=r.output_len, temperature=temperature,
                                          ignore_eos=True), final_only=True)
    _sync(runner.device)
    spec_before = replace(engine.spec_stats, accepted_per_pos=[])
    start = time.monotonic()
    peak_kv, floor_bytes, steps, out_tokens, roofline_s = 0.0, 0, 0, 0, 0.0
    ttfts: list[float] = []
    tpots: list[float] = []
    while engine.has_unfinished_requests():
        outputs = engine.step()
        now = time.monotonic()
        steps += 1
        sched = engine.last_scheduled
        peak_kv = max(peak_kv, engine.kv_usage())
        step_bytes = weight_bytes + kv_token_bytes * sum(
            s.num_computed_tokens + s.num_new_tokens for s in sched.scheduled)
        floor_bytes += step_bytes
        roofline_s += max(step_bytes / bw, flops.step(sched.scheduled) / rate)
        for o in outputs:
            n = len(o.outputs[0].token_ids)
            out_tokens += n
            first = o.metrics["first_token_time"]
            ttfts.append(first - start)
            if n > 1:
                tpots.append((now - first) / (n - 1))
    _sync(runner.device)
    wall = time.monotonic() - start
    prompt_tokens = sum(len(r.prompt_token_ids) for r in requests)
    floor_s = floor_bytes / bw
    spec = {}
    if engine.proposer is not None:   # this run's proposals (the warm-up's left out)
        st = engine.spec_stats.since(spec_before)
        spec = {"spec_num_drafts": st.num_drafts, "spec_draft_tokens": st.num_draft_tokens,
                "spec_acceptance_rate": st.acceptance_rate,
                "spec_mean_accepted_length": st.mean_accepted_length}
    return {**spec,
        "requests": len(requests), "wall_s": wall, "steps": steps,
        "output_tokens": out_tokens, "prompt_tokens": prompt_tokens,
        "output_tok_s": out_tokens / wall, "total_tok_s": (out_tokens + prompt_tokens) / wall,
        "requests_s": len(requests) / wall, "peak_kv_usage": peak_kv,
        "copy_bandwidth_gb_s": bw / 1e9, "bandwidth_floor_s": floor_s,
        "floor_output_tok_s": out_tokens / floor_s, "fraction_of_floor": floor_s / wall,
        "weight_gb": weight_bytes / 1e9, "matmul_tflop_s": rate / 1e12,
        "roofline_floor_s": roofline_s, "fraction_of_roofline": roofline_s / wall,
        "mean_ttft_s": sum(ttfts) / len(ttfts) if ttfts else 0.0,
        "mean_tpot_ms": 1e3 * sum(tpots) / len(tpots) if tpots else 0.0,
        "prefill_tflop_s": _forward_flops(runner.model.spec, requests) / wall / 1e12,
    }


def _forward_flops(spec, requests: list[BenchRequest]) -> float:
    """Matmul FLOPs of the prompts' forward passes (dense layers + causal attention),
    for the prefill-only case (output length 1) where they dominate the wall time."""
    h, L = spec.hidden_size, spec.num_layers
    q, kv = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    per_token = 2 * L * (h * (q + 2 * kv) + q * h + 3 * h * spec.intermediate_size)
    total = 0.0
    for r in requests:
        t = len(r.prompt_token_ids)
        total += per_token * t + 2 * L * 2 * q * t * t / 2 + 2 * h * spec.vocab_size
    return total


def main(args: argparse.Namespace, engine_config) -> int:
    from orbitllm import LLM
    if args.random_weights:
        engine_config.load_format = "dummy"
    llm = LLM(**asdict(engine_config))
    spec = llm.engine.runner.model.spec
    requests = make_requests(args, spec.vocab_size, llm.get_tokenizer())
    # Warm-up: compile kernels and capture graphs outside the timed region.
    run(llm, requests[:2], args.temperature)
    llm.engine.reset_prefix_cache()   # the warm-up's prompts must not be cache hits
    result = run(llm, requests, args.temperature)
    result.update(model=engine_config.model, device=str(llm.engine.runner.device),
                  dtype=str(llm.engine.runner.dtype))
    for k, v in result.items():
        print(f"{k:>22}: {v:.4g}" if isinstance(v, float) else f"{k:>22}: {v}")
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


def register(subparsers, add_engine_args, engine_config_from_args) -> None:
    p = subparsers.add_parser("throughput", help="offline throughput on a synthetic or file workload")
    add_engine_args(p)
    add_args(p)
    p.set_defaults(func=lambda args: main(args, engine_config_from_args(args)))
