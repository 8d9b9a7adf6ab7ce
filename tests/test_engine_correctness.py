"""Greedy tokens of orbitllm equal transformers' generate, for every family and
under every scheduling regime (prefix caching on/off, chunked prefill, preemption)."""
from __future__ import annotations

import random

import pytest
import torch

from conftest import FAMILIES, assert_all_blocks_free
from orbitllm import LLM, SamplingParams

MAX_NEW = 20
PROMPT_LENS = [3, 17, 33, 58]


def _prompts(vocab: int) -> list[list[int]]:
    rng = random.Random(7)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in PROMPT_LENS]


@pytest.fixture(scope="module")
def references(tiny_models):
    from transformers import AutoModelForCausalLM
    refs = {}
    for family, path in tiny_models.items():
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        prompts = _prompts(hf.config.vocab_size)
        outs = []
        for p in prompts:
            gen = hf.generate(torch.tensor([p]), max_new_tokens=MAX_NEW, do_sample=False,
                              eos_token_id=None, pad_token_id=0)
            outs.append(gen[0, len(p):].tolist())
        refs[family] = (prompts, outs)
    return refs


MODES = {
    "default": {},
    "no_prefix_cache": {"enable_prefix_caching": False},
    "chunked_prefill": {"max_num_batched_tokens": 7},
    "preemption": {"num_kv_blocks": 7, "block_size": 16},
    # Overlapped scheduling (normally GPU-only) forced on: step n+1 is scheduled and
    # launched before step n's tokens are read, with preemption and chunking in play.
    "overlap": {"num_kv_blocks": 7, "max_num_batched_tokens": 20},
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_matches_transformers(tiny_models, references, family, mode):
    prompts, expected = references[family]
    llm = LLM(tiny_models[family], **{"num_kv_blocks": 64, **MODES[mode]})
    llm.engine.overlap = mode == "overlap"
    params = SamplingParams(max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    got = [o.outputs[0].token_ids for o in outs]
    assert got == expected
    assert all(o.outputs[0].finish_reason == "length" for o in outs)
    if mode in ("preemption", "overlap"):
        assert llm.engine.scheduler.num_preemptions > 0
    assert_all_blocks_free(llm)
    # A second pass reuses cached prefixes (where enabled) and must not change anything.
    outs2 = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs2] == expected
    assert_all_blocks_free(llm)


def test_start_up_prefill_warm_up_writes_no_kv(tiny_models):
    """The dummy prefill that compiles the kernels at start-up (CUDA) must leave the
    KV cache untouched and the engine's output unchanged; run it here on CPU."""
    from orbitllm import LLM, SamplingParams
    llm = LLM(tiny_models["llama"], device="cpu", dtype="float32", num_kv_blocks=64)
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    before = llm.generate([[5, 6, 7, 8, 9]], params)[0].outputs[0].token_ids
    runner = llm.engine.runner
    cache = runner.kv_cache.clone()
    from orbitllm.executor.model_runner import compile_prefill_path
    compile_prefill_path(runner.model, runner.backend, runner.kv_cache, 2 * runner.block_size)
    assert torch.equal(runner.kv_cache, cache)
    llm.engine.reset_prefix_cache()
    after = llm.generate([[5, 6, 7, 8, 9]], params)[0].outputs[0].token_ids
    assert after == before
    assert_all_blocks_free(llm)
