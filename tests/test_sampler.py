"""Sampler: filters against a reference, exact distributions, seeds, penalties."""
from __future__ import annotations

import math

import pytest
import torch

from orbitllm import SamplingParams
from orbitllm.layers.sampler import (Sampler, SamplingBatch, SamplingRows, apply_penalties,
                                     apply_top_k_top_p_min_p)


def _ref_filter(logits: list[float], k: int, p: float, min_p: float) -> set[int]:
    """Kept token ids, computed the slow obvious way."""
    order = sorted(range(len(logits)), key=lambda i: -logits[i])
    keep = order[:k] if k > 0 else order
    z = [math.exp(logits[i]) for i in keep]
    total = sum(z)
    kept, mass = [], 0.0
    for i, zi in zip(keep, z):
        if mass >= p:
            break
        kept.append(i)
        mass += zi / total
    probs_all = {i: math.exp(logits[i]) for i in kept}
    s = sum(probs_all.values())
    top = max(probs_all.values()) / s
    return {i for i in kept if probs_all[i] / s >= min_p * top}


@pytest.mark.parametrize("k,p,min_p", [(0, 1.0, 0.0), (3, 1.0, 0.0), (0, 0.5, 0.0),
                                       (5, 0.8, 0.0), (0, 1.0, 0.2), (4, 0.9, 0.1), (1, 0.3, 0.5)])
def test_filters_match_reference(k, p, min_p):
    torch.manual_seed(0)
    logits = torch.randn(6, 20) * 2
    out = apply_top_k_top_p_min_p(
        logits.clone(), torch.full((6,), k if k else 20) if k else None,
        torch.full((6,), p) if p < 1 else None, torch.full((6,), min_p) if min_p else None)
    for row in range(6):
        kept = {i for i in range(20) if out[row, i] > float("-inf")}
        assert kept == _ref_filter(logits[row].tolist(), k, p, min_p)


def _rows(params: list[SamplingParams], seeds: list[int | None] | None = None,
          histories: list[list[int] | None] | None = None) -> SamplingRows:
    """Rows drawing their requests' first output token; a history is all prompt."""
    n = len(params)
    histories = histories or [None] * n
    return SamplingRows([str(i) for i in range(n)], params, seeds or [None] * n, [0] * n,
                        histories, [len(h) if h else 0 for h in histories])


def _batch(params: SamplingParams, rows: int, seed_base: int | None = None) -> SamplingBatch:
    seeds = [None if seed_base is None else seed_base + i for i in range(rows)]
    return SamplingBatch.build(_rows([params] * rows, seeds), 8, torch.device("cpu"),
                               eos_token_ids=set())


def test_samples_follow_the_distribution():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0, 0.2, 1.5])
    rows = 40000
    for temp in (1.0, 0.5):
        params = SamplingParams(temperature=temp)
        out = Sampler(0, torch.device("cpu"))(logits.expand(rows, -1).clone(), _batch(params, rows))
        counts = torch.bincount(out.token_ids, minlength=8).double()
        expected = (logits / temp).softmax(-1).double() * rows
        chi2 = ((counts - expected) ** 2 / expected).sum().item()
        assert chi2 < 24.3, chi2   # 99.9th percentile of chi-square with 7 degrees of freedom


def test_top_k_sampling_never_leaves_the_top_k():
    logits = torch.randn(5000, 8)
    out = Sampler(1, torch.device("cpu"))(logits.clone(), _batch(SamplingParams(top_k=2), 5000))
    top2 = logits.topk(2, dim=-1).indices
    assert (top2 == out.token_ids[:, None]).any(-1).all()


def test_seeded_rows_are_reproducible_and_independent_of_the_batch():
    logits = torch.randn(4, 8)
    params = SamplingParams(temperature=1.0)
    a = Sampler(0, torch.device("cpu"))(logits.clone(), _batch(params, 4, seed_base=100)).token_ids
    b = Sampler(99, torch.device("cpu"))(logits.clone(), _batch(params, 4, seed_base=100)).token_ids
    assert a.tolist() == b.tolist()
    single = Sampler(5, torch.device("cpu"))(logits[2:3].clone(), _batch(params, 1, seed_base=102))
    assert single.token_ids.item() == a[2].item()


def test_penalties_match_a_loop():
    torch.manual_seed(3)
    logits = torch.randn(2, 10)
    ids = torch.tensor([[1, 2, 2, 5, -1], [3, 3, 3, 0, 7]])
    is_out = torch.tensor([[False, True, True, True, False], [False, False, True, True, True]])
    rep, pres, freq = torch.tensor([1.3, 0.7]), torch.tensor([0.5, -0.2]), torch.tensor([0.25, 1.0])
    got = apply_penalties(logits.clone(), (ids, is_out, rep, pres, freq))
    want = logits.clone()
    for b in range(2):
        seen = {int(t) for t in ids[b] if t >= 0}
        outs = [int(t) for t, o in zip(ids[b], is_out[b]) if o and t >= 0]
        for t in seen:
            want[b, t] = want[b, t] / rep[b] if want[b, t] > 0 else want[b, t] * rep[b]
        for t in set(outs):
            want[b, t] -= freq[b] * outs.count(t) + pres[b]
    torch.testing.assert_close(got, want)


def test_greedy_and_logprobs():
    logits = torch.randn(3, 8)
    params = SamplingParams(temperature=0, logprobs=3)
    out = Sampler(0, torch.device("cpu"))(logits.clone(), _batch(params, 3))
    assert out.token_ids.tolist() == logits.argmax(-1).tolist()
    torch.testing.assert_close(out.top_logprobs, logits.log_softmax(-1).topk(3).values)
    assert out.ranks.tolist() == [1, 1, 1]


def test_min_tokens_bans_eos_and_stop_ids():
    params = SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[4])
    batch = SamplingBatch.build(_rows([params]), 8, torch.device("cpu"), eos_token_ids={3})
    logits = torch.tensor([[0.0, 0, 0, 9, 8, 1, 0, 0]])
    assert Sampler(0, torch.device("cpu"))(logits, batch).token_ids.item() == 5


@pytest.mark.parametrize("greedy_rows", [(0, 2), ()])
def test_greedy_rows_beside_sampled_rows(greedy_rows):
    """Greedy rows take the argmax in a batch whose other rows sample (and a batch
    without greedy rows skips the argmax pass but still samples every row)."""
    cpu = torch.device("cpu")
    logits = torch.zeros(4, 16)
    logits[:, 5] = 0.5   # the argmax, but far from certain when sampling
    rows = _rows([SamplingParams(temperature=0 if i in greedy_rows else 1.0) for i in range(4)])
    batch = SamplingBatch.build(rows, 16, cpu, eos_token_ids=set())
    assert batch.any_greedy == bool(greedy_rows) and not batch.all_greedy
    sampler = Sampler(0, cpu)
    draws = [sampler(logits.clone(), batch).token_ids.tolist() for _ in range(60)]
    for row in range(4):
        seen = {d[row] for d in draws}
        if row in greedy_rows:
            assert seen == {5}
        else:
            assert len(seen) > 5   # 60 draws over 16 near-uniform tokens


def test_precomputed_argmax_is_used_only_where_nothing_changes_the_logits():
    """The decode graph hands the sampler its argmax. Greedy rows take it (with or
    without logprobs, in a mixed batch too); with banned tokens or penalties the
    sampler takes its own argmax of the changed logits."""
    torch.manual_seed(3)
    logits = torch.randn(4, 8)
    ids = logits.argmax(-1)
    sampler = Sampler(0, torch.device("cpu"))
    greedy = SamplingParams(temperature=0)
    assert sampler(logits.clone(), _batch(greedy, 4), ids).token_ids is ids
    with_lps = sampler(logits.clone(), _batch(SamplingParams(temperature=0, logprobs=2), 4), ids)
    assert with_lps.token_ids.tolist() == ids.tolist()
    assert torch.equal(with_lps.logprobs, logits.log_softmax(-1).gather(1, ids[:, None]).squeeze(1))
    mixed = _rows([greedy, SamplingParams(temperature=1.0)], seeds=[None, 7])
    batch = SamplingBatch.build(mixed, 8, torch.device("cpu"), eos_token_ids=set())
    sentinel = torch.tensor([5, 5])   # not an argmax: shows which rows take the given ids
    out = sampler(logits[:2].clone(), batch, sentinel)
    alone = Sampler(0, torch.device("cpu"))(logits[1:2].clone(), SamplingBatch.build(
        _rows([SamplingParams(temperature=1.0)], seeds=[7]), 8, torch.device("cpu"),
        eos_token_ids=set()))
    assert out.token_ids.tolist() == [5, alone.token_ids.item()]
    # The top token banned (EOS under min_tokens) or penalized: the given argmax is stale.
    top = int(ids[0])
    banned = _rows([SamplingParams(temperature=0, min_tokens=3)])
    out = sampler(logits[:1].clone(), SamplingBatch.build(banned, 8, torch.device("cpu"), {top}), ids[:1])
    assert out.token_ids.item() == int(logits[0].clone().index_fill_(0, torch.tensor([top]), -1e9).argmax())
    penalized = _rows([SamplingParams(temperature=0, repetition_penalty=50.0)], histories=[[top]])
    assert logits[0, top] > 0   # so the penalty divides it 50-fold and it is no longer the top
    out = sampler(logits[:1].clone(), SamplingBatch.build(penalized, 8, torch.device("cpu"), set()),
                  ids[:1])
    assert out.token_ids.item() != top
