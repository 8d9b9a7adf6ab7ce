"""The offline throughput benchmark's floors: the FLOP count against the model's
shapes, and a run on a tiny model on CPU; the device A/B's check of peer results."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
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


def _peer_result(tok_s: float, ms: float, prefix_s: float, startup_s: float) -> dict:
    """The shape of a ../shared/peers/peer_bench.py result file."""
    return {"engine": "orbitllm", "model": "qwen3-0.6b", "startup_s": startup_s,
            "nano": {"output_tok_s": tok_s, "wall_s": 1.0}, "single_ms_per_token": ms,
            "prefix": {"wall_s": prefix_s, "output_tok_s": 1.0}}


def test_peer_compare_flags_only_a_checked_figure_beyond_the_tolerance(tmp_path):
    """benchmarks/peer_compare.py, the device A/B's check: a figure worse than the old
    tree's by more than the tolerance fails it (tok/s lower, seconds higher); start-up
    time is shown but never fails it."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "peer_compare.py"
    last_output = []

    def check(new: dict) -> int:
        files = []
        for name, result in (("old", _peer_result(20000, 1.20, 2.00, 10.0)), ("new", new)):
            (tmp_path / f"{name}.json").write_text(json.dumps(result))
            files.append(f"{name}={tmp_path / name}.json")
        done = subprocess.run([sys.executable, str(script), "--tolerance", "3", *files],
                              capture_output=True, text=True)
        last_output[:] = done.stdout.splitlines()
        return done.returncode

    assert check(_peer_result(19500, 1.23, 2.05, 30.0)) == 0    # 2.5% each, start-up 3x
    assert check(_peer_result(19300, 1.20, 2.00, 10.0)) == 1    # throughput 3.5% lower
    assert check(_peer_result(20000, 1.24, 2.00, 10.0)) == 1    # 3.3% more ms per token
    assert check(_peer_result(20000, 1.20, 1.50, 10.0)) == 0    # faster is never flagged
    assert [line.split(" | ")[0] for line in last_output[2:]] == ["nano", "single", "prefix", "start-up"]
    assert not any("WORSE" in line for line in last_output)
