"""Beam search and copy-on-write forking of block tables.

Beam search is checked against a reference written here over the transformers model
(every beam recomputed from scratch each step, vLLM's selection rule); forking by
counting the tokens each step computes, with the prefix cache off, and by seeded
``n`` > 1 samples equal to their independent single-sequence twins."""
from __future__ import annotations

import math

import pytest
import torch

from orbitllm import LLM, BeamSearchParams, SamplingParams
from conftest import assert_all_blocks_free

PROMPTS = ["The quick brown fox", "def add(a, b):", "Paged attention stores keys"]


@pytest.fixture(scope="module")
def model_path(tiny_models) -> str:
    return tiny_models["llama"]


@pytest.fixture(scope="module", params=[True, False], ids=["prefix-cache", "no-prefix-cache"])
def llm(model_path, request) -> LLM:
    return LLM(model_path, max_model_len=256, num_kv_blocks=128,
               enable_prefix_caching=request.param)


@pytest.fixture(scope="module")
def hf_model(model_path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()


@torch.no_grad()
def reference_beam_search(model, prompt_ids: list[int], width: int, max_tokens: int,
                          length_penalty: float, eos: int | None):
    """Plain beam search: each step, every beam's next-token log-softmax from a full
    forward pass, its 2*width best continuations; EOS ends a beam; the best ``width``
    by cum_logprob / len^penalty (len: prompt + output, without a final EOS)."""
    def score(tokens, cum, ended):
        return cum / ((len(tokens) - ended) ** length_penalty)
    beams, done = [(list(prompt_ids), 0.0)], []
    for _ in range(max_tokens):
        if not beams:
            break
        cands = []
        for tokens, cum in beams:
            logits = model(torch.tensor([tokens])).logits[0, -1].float()
            lps = torch.log_softmax(logits, -1)
            top = torch.topk(lps, 2 * width)
            for lp, tid in zip(top.values.tolist(), top.indices.tolist()):
                (done if tid == eos else cands).append((tokens + [tid], cum + lp))
        beams = sorted(cands, key=lambda b: score(*b, False), reverse=True)[:width]
    ranked = sorted([(t, c, True) for t, c in done] + [(t, c, False) for t, c in beams],
                    key=lambda b: score(*b), reverse=True)
    return ranked[:width]


@pytest.fixture(scope="module")
def references(hf_model):
    """Reference results, computed once for both engine variants."""
    cache = {}

    def get(ids: list[int], width: int, penalty: float):
        key = (tuple(ids), width, penalty)
        if key not in cache:
            cache[key] = reference_beam_search(hf_model, ids, width, 6, penalty, eos=0)
        return cache[key]
    return get


@pytest.mark.parametrize("width,penalty", [(3, 1.0), (2, 0.0)])
def test_beam_search_matches_reference(llm, references, width, penalty):
    tok = llm.get_tokenizer()
    params = BeamSearchParams(beam_width=width, max_tokens=6, length_penalty=penalty)
    outs = llm.beam_search(PROMPTS, params)
    for prompt, out in zip(PROMPTS, outs):
        ref = references(tok.encode(prompt), width, penalty)
        assert [s.tokens for s in out.sequences] == [t for t, _, _ in ref]
        for seq, (_, cum, ended) in zip(out.sequences, ref):
            assert math.isclose(seq.cum_logprob, cum, abs_tol=1e-3)
            assert seq.finish_reason == ("stop" if ended else "length")
    assert_all_blocks_free(llm)


def test_beam_search_with_eos(llm, hf_model):
    """Beams that end on EOS. Random tiny weights rarely pick the real EOS, so EOS is
    made the reference's most likely first token here."""
    tok = llm.get_tokenizer()
    ids = tok.encode(PROMPTS[0])
    first = int(hf_model(torch.tensor([ids])).logits[0, -1].argmax())
    llm.engine.eos_token_ids.add(first)
    try:
        out = llm.beam_search([ids], BeamSearchParams(beam_width=3, max_tokens=4))[0]
        ignored = llm.beam_search([ids], BeamSearchParams(beam_width=3, max_tokens=4,
                                                          ignore_eos=True))[0]
    finally:
        llm.engine.eos_token_ids.discard(first)
    ref = reference_beam_search(hf_model, ids, 3, 4, 1.0, eos=first)
    assert [s.tokens for s in out.sequences] == [t for t, _, _ in ref]
    assert any(s.finish_reason == "stop" for s in out.sequences) == any(e for _, _, e in ref)
    assert all(s.finish_reason == "length" and len(s.tokens) == len(ids) + 4
               for s in ignored.sequences)
    assert_all_blocks_free(llm)


def test_beams_fork_instead_of_recomputing(model_path):
    """Without the prefix cache, each beam step computes only the forked beams' last
    partial block (their first write), never their whole prefix."""
    llm = LLM(model_path, max_model_len=256, num_kv_blocks=64, enable_prefix_caching=False)
    engine, computed = llm.engine, []
    step = engine.step

    def counting_step():
        outs = step()
        computed.append(engine.last_scheduled.num_batched_tokens)
        return outs

    engine.step = counting_step
    ids = list(range(5, 5 + 40))                       # 40 prompt tokens: 2 full blocks + 8
    llm.beam_search([ids], BeamSearchParams(beam_width=4, max_tokens=5, ignore_eos=True))
    # Step t > 1: each of 4 beams has 40 + t - 1 tokens, shares its parent's full blocks of
    # the first 40 + t - 2 (two blocks, 32 tokens) and computes the rest.
    assert sum(computed) == 40 + sum(4 * (40 + t - 1 - 32) for t in range(2, 6))
    assert_all_blocks_free(llm)


def test_n_forks_after_prefill_and_keeps_seeded_samples(model_path):
    llm = LLM(model_path, max_model_len=256, num_kv_blocks=64, enable_prefix_caching=False)
    engine = llm.engine
    prompt = list(range(7, 7 + 50))                    # 3 full blocks + 2 tokens
    engine.add_request("n4", {"prompt_token_ids": prompt},
                       SamplingParams(n=4, max_tokens=5, temperature=1.0, seed=9, ignore_eos=True),
                       final_only=True)
    computed, outs = 0, []
    while engine.has_unfinished_requests():
        outs += engine.step()
        computed += engine.last_scheduled.num_batched_tokens
    # The prompt once, the 3 other sequences its last partial block (2 tokens) each, 4 decodes each.
    assert computed == 50 + 3 * 2 + 4 * 4
    # The same samples as four independent requests with the sequences' own seeds.
    for i, out in enumerate(outs[-1].outputs):
        seed = 9 if i == 0 else 9 * 7919 + i
        alone = llm.generate({"prompt_token_ids": prompt}, SamplingParams(
            max_tokens=5, temperature=1.0, seed=seed, ignore_eos=True), use_tqdm=False)[0]
        assert out.token_ids == alone.outputs[0].token_ids
    assert_all_blocks_free(llm)


def test_fork_shares_full_blocks_by_ref_count(model_path):
    llm = LLM(model_path, max_model_len=256, num_kv_blocks=32, enable_prefix_caching=False)
    engine = llm.engine
    engine.add_request("p", {"prompt_token_ids": list(range(3, 3 + 40))},
                       SamplingParams(max_tokens=1), final_only=True, keep_blocks=True)
    while engine.has_unfinished_requests():
        engine.step()
    parent_blocks = list(engine.kv.block_ids("p"))
    assert len(parent_blocks) == 3 and engine.num_free_blocks == 29    # kept after finishing
    engine.add_request("c", {"prompt_token_ids": list(range(3, 3 + 40)) + [9]},
                       SamplingParams(max_tokens=4), final_only=True, fork_from="p")
    child = engine.scheduler.waiting[0][1]
    assert child.num_computed_tokens == 32
    assert engine.kv.block_ids("c") == parent_blocks[:2]
    assert [engine.kv.pool.blocks[b].ref_cnt for b in parent_blocks] == [2, 2, 1]
    with pytest.raises(ValueError, match="fork_from"):
        engine.add_request("d", [1, 2, 3], SamplingParams(), fork_from="nope")
    engine.release_blocks("p")
    while engine.has_unfinished_requests():
        engine.step()
    assert_all_blocks_free(llm)


def test_beam_search_params_are_checked():
    with pytest.raises(ValueError, match="beam_width"):
        BeamSearchParams(beam_width=0, max_tokens=3)
    with pytest.raises(ValueError, match="max_tokens"):
        BeamSearchParams(beam_width=2, max_tokens=0)
