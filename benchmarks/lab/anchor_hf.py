"""Anchor: Hugging Face transformers' continuous batching on the same workload.

Runs `continuous_batching_context_manager` (paged|sdpa attention, CUDA graphs
where the installed transformers supports them) with the same requests as
`orbitllm bench throughput` (same lengths, token ids and seed), random weights
with the same shapes, and prints output tokens/s; with --orbitllm-json it also
prints orbitllm's figure from the same run and the ratio.

    python benchmarks/lab/anchor_hf.py --model qwen3-0.6b --num-prompts 256
"""
from __future__ import annotations

import argparse
import inspect
import json
import time

import torch

from orbitllm.bench.throughput import make_requests
from orbitllm.models.loader import open_shape


def _cb_config(cuda_graphs: bool):
    try:
        from transformers import ContinuousBatchingConfig
    except ImportError:
        try:
            from transformers.generation.configuration_utils import ContinuousBatchingConfig
        except ImportError:
            return None
    fields = inspect.signature(ContinuousBatchingConfig).parameters
    return ContinuousBatchingConfig(**({"use_cuda_graph": cuda_graphs} if "use_cuda_graph" in fields else {}))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="qwen3-0.6b")
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--input-len", type=int, default=None)
    p.add_argument("--output-len", type=int, default=None)
    p.add_argument("--min-len", type=int, default=100)
    p.add_argument("--max-len", type=int, default=1024)
    p.add_argument("--dataset", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--attn", default="paged|sdpa")
    p.add_argument("--no-cuda-graphs", action="store_true")
    p.add_argument("--orbitllm-json", default=None, help="orbitllm's result from the same run")
    p.add_argument("--output-json", default=None)
    args = p.parse_args()

    from transformers import AutoModelForCausalLM, GenerationConfig
    ckpt = open_shape(args.model)
    torch.manual_seed(args.seed)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(ckpt.config, dtype=torch.bfloat16,
                                                 attn_implementation=args.attn).eval()
    requests = make_requests(args, ckpt.config.vocab_size, None)
    gen = GenerationConfig(max_new_tokens=max(r.output_len for r in requests),
                           do_sample=args.temperature > 0, temperature=args.temperature or None,
                           eos_token_id=-1, pad_token_id=0)
    kwargs = {"generation_config": gen}
    cb = _cb_config(not args.no_cuda_graphs)
    if cb is not None and "continuous_batching_config" in inspect.signature(
            model.continuous_batching_context_manager).parameters:
        kwargs["continuous_batching_config"] = cb

    with model.continuous_batching_context_manager(**kwargs) as manager:
        manager.add_request(input_ids=requests[0].prompt_token_ids, max_new_tokens=4)  # warm-up
        while True:
            r = manager.get_result(timeout=60)
            if r is not None and r.is_finished():
                break
        torch.cuda.synchronize()
        start = time.perf_counter()
        ids = [manager.add_request(input_ids=r.prompt_token_ids, max_new_tokens=r.output_len)
               for r in requests]
        done, out_tokens = 0, 0
        while done < len(ids):
            r = manager.get_result(timeout=5)
            if r is None:
                if not manager.is_running():
                    raise RuntimeError("transformers' generation loop stopped")
                continue
            if r.is_finished():
                done += 1
                out_tokens += len(r.generated_tokens)
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
    result = {"anchor": f"transformers {__import__('transformers').__version__} continuous batching "
                        f"({args.attn}, cuda graphs {'off' if args.no_cuda_graphs else 'on'})",
              "model": args.model, "requests": len(requests), "output_tokens": out_tokens,
              "wall_s": wall, "output_tok_s": out_tokens / wall}
    if args.orbitllm_json:
        with open(args.orbitllm_json) as f:
            ours = json.load(f)
        result["orbitllm_output_tok_s"] = ours["output_tok_s"]
        result["ratio"] = ours["output_tok_s"] / result["output_tok_s"]
    for k, v in result.items():
        print(f"{k:>22}: {v:.4g}" if isinstance(v, float) else f"{k:>22}: {v}")
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
