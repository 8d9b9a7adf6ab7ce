"""On a GPU: the Triton backend (with and without CUDA graphs) gives the same greedy
tokens as the PyTorch reference backend, in float32, for every family."""
from __future__ import annotations

import random

import pytest
import torch

from conftest import FAMILIES, assert_all_blocks_free
from orbitllm import LLM, SamplingParams

pytestmark = pytest.mark.gpu


def _prompts() -> list[dict]:
    rng = random.Random(3)
    return [{"prompt_token_ids": [rng.randrange(3, 300) for _ in range(n)]} for n in (5, 40, 77, 130)]


def _greedy_tokens(model: str, **kwargs) -> list[list[int]]:
    """24 greedy tokens for each of ``_prompts()`` from a float32 engine; checks that
    every KV block is back in the pool, then shuts the engine down."""
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    with LLM(model, dtype="float32", num_kv_blocks=128, max_model_len=1024, **kwargs) as llm:
        outs = llm.generate(_prompts(), params, use_tqdm=False)
        assert_all_blocks_free(llm)
    return [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize("family", FAMILIES)
def test_triton_matches_torch_backend(tiny_models, family):
    results = {name: _greedy_tokens(tiny_models[family], **kwargs) for name, kwargs in {
        "torch": dict(attention_backend="torch"),
        "triton_eager": dict(attention_backend="triton", enforce_eager=True),
        "triton_graphs": dict(attention_backend="triton", max_num_seqs=8),
        "triton_chunked": dict(attention_backend="triton", max_num_batched_tokens=16)}.items()}
    assert results["triton_eager"] == results["torch"]
    assert results["triton_graphs"] == results["torch"]
    assert results["triton_chunked"] == results["torch"]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_tensor_parallel_on_gpus_matches_one_gpu(tiny_models, family):
    """N=2 over NCCL (all-reduce captured in the CUDA graphs) and with the fused
    peer-memory all-reduce + add + RMSNorm (decode steps; prefill steps of more than
    max_num_seqs rows fall back to NCCL) give N=1's greedy tokens. The peer engine runs
    twice: the second maps the peers' memory again in the same driver process."""
    results = {name: _greedy_tokens(tiny_models[family], max_num_seqs=8, **kwargs) for name, kwargs in {
        "n1": {}, "n2_nccl": dict(tensor_parallel_size=2, tp_all_reduce="nccl"),
        "n2_peer": dict(tensor_parallel_size=2, tp_all_reduce="peer"),
        "n2_peer_again": dict(tensor_parallel_size=2, tp_all_reduce="peer")}.items()}
    assert results["n2_nccl"] == results["n1"]
    assert results["n2_peer"] == results["n1"]
    assert results["n2_peer_again"] == results["n1"]


def _one_request_bf16(model: str, **kwargs) -> tuple[list[int], list[float]]:
    """One bfloat16 request: its decode steps have one row, so they take the Triton
    GEMV (and, with two ranks, the fused peer all-reduce). Greedy tokens and the
    chosen tokens' logprobs."""
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, logprobs=0)
    with LLM(model, dtype="bfloat16", num_kv_blocks=128, max_model_len=1024, **kwargs) as llm:
        out = llm.generate(_prompts()[2:3], params, use_tqdm=False)[0].outputs[0]
        assert_all_blocks_free(llm)
    return out.token_ids, [lp[t].logprob for t, lp in zip(out.token_ids, out.logprobs)]


@pytest.mark.parametrize("tp", [1, 2])
def test_programmatic_dependent_launch_changes_no_bits(tiny_models, monkeypatch, tp):
    """The decode kernels launched with PDL (each may start before the one before it
    ends) compute exactly what they compute launched one after the other: a missed
    wait would read a half-written input and change the logprobs."""
    if tp > torch.cuda.device_count():
        pytest.skip("needs two GPUs")
    from orbitllm.envs import envs
    from orbitllm.kernels import pdl
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("PDL needs compute capability 9")
    kwargs = dict(tensor_parallel_size=tp, max_num_seqs=8)
    with_pdl = _one_request_bf16(tiny_models["llama"], **kwargs)
    monkeypatch.setenv("ORBITLLM_PDL", "0")   # read by the workers, which start afresh
    envs.cache_clear()
    pdl._pdl_on.cache_clear()
    try:
        without = _one_request_bf16(tiny_models["llama"], **kwargs)
    finally:
        monkeypatch.delenv("ORBITLLM_PDL")
        envs.cache_clear()
        pdl._pdl_on.cache_clear()
    assert with_pdl == without


def test_silu_fused_into_the_down_gemv_changes_no_bits(tiny_models, monkeypatch):
    """One-row bf16 steps apply the MLP's SiLU·mul inside the down projection's GEMV;
    with it as its own kernel (the path of larger steps), the request gets the same
    tokens and logprobs."""
    from orbitllm.layers.activation import SiluAndMul
    fused = _one_request_bf16(tiny_models["llama"], max_num_seqs=8)
    monkeypatch.setattr(SiluAndMul, "fuses_into_gemv", False)
    assert _one_request_bf16(tiny_models["llama"], max_num_seqs=8) == fused


def test_decode_graph_logits_sample_like_eager_steps(tiny_models):
    """On one GPU the decode graph holds the LM head and the greedy argmax. Greedy rows
    beside sampled ones (the graph's argmax is taken), then rows with banned EOS and
    penalties (it is not): the same tokens and logprobs as steps without graphs."""
    def params(temperature=0.0, **kw):
        return SamplingParams(max_tokens=20, temperature=temperature, ignore_eos=True, **kw)
    batches = [[params(), params(0.8, seed=11, logprobs=3), params(logprobs=0), params()],
               [params(), params(0.8, seed=12), params(min_tokens=20, logprobs=1),
                params(repetition_penalty=1.3)]]
    results = {}
    for name, kwargs in {"eager": dict(enforce_eager=True), "graphs": dict(max_num_seqs=8)}.items():
        with LLM(tiny_models["llama"], dtype="float32", num_kv_blocks=128, max_model_len=1024,
                 **kwargs) as llm:
            assert (llm.engine.runner.graphs is not None) == (name == "graphs")
            outs = [o.outputs[0] for ps in batches
                    for o in llm.generate(_prompts(), ps, use_tqdm=False)]
            assert_all_blocks_free(llm)
        results[name] = ([o.token_ids for o in outs], [o.cumulative_logprob or 0.0 for o in outs])
    assert results["graphs"][0] == results["eager"][0]
    assert results["graphs"][1] == pytest.approx(results["eager"][1], abs=1e-4)
