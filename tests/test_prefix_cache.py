"""Prefix caching: block pool mechanics and end-to-end reuse of computed prompts."""
from __future__ import annotations

import random

import pytest

from conftest import assert_all_blocks_free
from orbitllm import LLM, SamplingParams
from orbitllm.engine.request import Request
from orbitllm.kv.block_pool import BlockPool, hash_block
from orbitllm.kv.kv_manager import KVCacheManager


def _req(rid: str, tokens: list[int], salt: str | None = None) -> Request:
    return Request(rid, tokens, SamplingParams(max_tokens=4), cache_salt=salt)


def test_hash_chains_and_salt():
    a = hash_block(None, [1, 2, 3, 4], None)
    assert a == hash_block(None, [1, 2, 3, 4], None) and len(a) == 32
    assert a != hash_block(None, [1, 2, 3, 5], None)
    assert a != hash_block(None, [1, 2, 3, 4], "tenant-a")
    b1, b2 = hash_block(a, [5, 6], None), hash_block(hash_block(None, [9], None), [5, 6], None)
    assert b1 != b2  # same tokens, different parents


def test_pool_lru_and_refcounts():
    pool = BlockPool(4)
    blocks = pool.allocate(3)
    assert pool.num_free_blocks == 1
    for i, b in enumerate(blocks):
        pool.cache(b, bytes([i]) * 32)
    pool.free(reversed(blocks))          # tail first: block 2 is evicted first
    assert pool.num_free_blocks == 4
    hit = pool.lookup(bytes([0]) * 32)
    pool.touch([hit])
    assert hit.ref_cnt == 1 and pool.num_free_blocks == 3
    fresh = pool.allocate(2)             # the never-cached block 3, then cached block 2
    assert [b.block_id for b in fresh] == [3, 2]
    assert pool.lookup(bytes([2]) * 32) is None and pool.lookup(bytes([1]) * 32) is not None
    with pytest.raises(RuntimeError):
        pool.allocate(5)


def test_manager_hits_full_blocks_but_never_the_last_token():
    kv = KVCacheManager(num_blocks=16, block_size=4, enable_prefix_caching=True)
    tokens = list(range(100, 112))               # exactly 3 full blocks
    a = _req("a", tokens)
    assert kv.allocate_slots(a, len(tokens))
    a.num_computed_tokens = len(tokens)
    b = _req("b", tokens)
    hits, n = kv.get_computed_blocks(b)
    assert n == 8 and len(hits) == 2             # last block would cover the last token
    assert kv.allocate_slots(b, len(tokens) - n, hits)
    assert kv.block_ids("b")[:2] == kv.block_ids("a")[:2]
    assert kv.block_ids("b")[2] != kv.block_ids("a")[2]
    c = _req("c", tokens, salt="other-tenant")
    assert kv.get_computed_blocks(c) == ([], 0)
    kv.free(a)
    kv.free(b)
    assert kv.num_free_blocks == 16


def test_preempted_allocation_does_not_leave_uncomputed_blocks_in_cache():
    kv = KVCacheManager(num_blocks=8, block_size=4, enable_prefix_caching=True)
    r = _req("r", list(range(16)))
    assert kv.allocate_slots(r, 16)     # registered, but never computed
    kv.free(r)                          # preempted before the step ran
    assert kv.get_computed_blocks(_req("s", list(range(16)))) == ([], 0)


@pytest.fixture(scope="module")
def llm(tiny_models):
    return LLM(tiny_models["llama"], num_kv_blocks=256)


def test_second_identical_prompt_computes_only_the_last_partial_block(llm):
    rng = random.Random(0)
    prompt = [rng.randrange(3, 300) for _ in range(1000)]
    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    first = llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0]
    second = llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0]
    assert first.num_cached_tokens == 0
    assert second.num_cached_tokens == 992      # 62 full blocks; 8 tokens computed
    assert second.outputs[0].token_ids == first.outputs[0].token_ids
    salted = llm.engine
    salted.add_request("salted", {"prompt_token_ids": prompt}, params, cache_salt="tenant-b")
    outs = []
    while salted.has_unfinished_requests():
        outs += salted.step()
    assert outs[-1].num_cached_tokens == 0
    assert outs[-1].outputs[0].token_ids == first.outputs[0].token_ids
    assert_all_blocks_free(llm)


def test_n_sequences_share_prompt_blocks(llm):
    rng = random.Random(1)
    prompt = [rng.randrange(3, 300) for _ in range(64)]
    llm.engine.reset_prefix_cache()
    engine = llm.engine
    engine.add_request("n3", {"prompt_token_ids": prompt},
                       SamplingParams(n=3, max_tokens=6, temperature=1.0, seed=5), final_only=True)
    computed, outs = 0, []
    while engine.has_unfinished_requests():
        outs += engine.step()
        computed += engine.last_scheduled.num_batched_tokens
    out = outs[-1]
    assert len(out.outputs) == 3 and [o.index for o in out.outputs] == [0, 1, 2]
    # Children 2 and 3 are forked from the first after its prompt: they share its 3 full
    # blocks and recompute only the 4th (which holds the last token), then 5 decodes each.
    assert computed == 64 + 2 * 16 + 3 * 5
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1
    assert_all_blocks_free(llm)
