"""The offline throughput benchmark's floors: the FLOP count against the model's
shapes, and a run on a tiny model on CPU."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from conftest import FAMILIES, assert_all_blocks_free
from orbitllm import LLM
from orbitllm.bench.throughput import BenchRequest, StepFlops, run


@pytest.mark.parametrize("family", FAMILIES)
def test_step_flops_match_the_shapes(tiny_models, family):
    """Dense FLOPs per token from the weights equal 2 x (QKV + O + gate/up + down) from
    the config; attention counts every (query, key) pair of a causal chunk once."""
    with LLM(tiny_models[family], device="cpu", num_kv_blocks=16) as llm:
        model = llm.engine.runner.model
        spec = model.spec
        flops = StepFlops.of(model)
    h, q, kv = spec.hidden_size, spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    layer_params = h * (q + 2 * kv) + q * h + 3 * h * spec.intermediate_size
    assert flops.dense_per_token == 2 * spec.num_layers * layer_params
    assert flops.attn_per_pair == 4 * q * spec.num_layers
    assert flops.head_per_row == 2 * spec.vocab_size * h

    # A chunk of 5 new tokens after 7 computed ones, and a decode token after 20.
    chunk = SimpleNamespace(num_new_tokens=5, num_computed_tokens=7)
    decode = SimpleNamespace(num_new_tokens=1, num_computed_tokens=20)
    pairs = sum(7 + i + 1 for i in range(5)) + 21
    want = flops.dense_per_token * 6 + flops.attn_per_pair * pairs + 2 * flops.head_per_row
    assert flops.step([chunk, decode]) == pytest.approx(want)


def test_run_reports_both_floors(tiny_models):
    """The roofline floor is at least the bandwidth floor: each step counts the longer
    of its reads and its FLOPs."""
    with LLM(tiny_models["llama"], device="cpu", num_kv_blocks=64) as llm:
        requests = [BenchRequest(list(range(10, 10 + n)), 4) for n in (5, 30, 60)]
        result = run(llm, requests, temperature=0.0)
        assert_all_blocks_free(llm)
    assert result["output_tokens"] == 12 and result["prompt_tokens"] == 95
    assert result["roofline_floor_s"] >= result["bandwidth_floor_s"] > 0
    assert result["matmul_tflop_s"] > 0
    assert result["fraction_of_roofline"] == pytest.approx(result["roofline_floor_s"] / result["wall_s"])
