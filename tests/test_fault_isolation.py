"""A step that fails for one request fails that request only: the others finish with
exactly the tokens they would have had, and every KV block comes back."""
from __future__ import annotations

import pytest

from conftest import assert_all_blocks_free
from orbitllm import LLM, SamplingParams
from orbitllm.layers import sampler as sampler_module

CULPRIT = "culprit"
PREFIX = list(range(5, 45))   # 40 tokens: two full blocks of 16 shared with a victim


@pytest.fixture(scope="module")
def llm(tiny_models) -> LLM:
    return LLM(tiny_models["llama"], max_model_len=256, num_kv_blocks=128)


def _victims() -> list[tuple[str, list[int], SamplingParams]]:
    greedy = dict(max_tokens=12, ignore_eos=True, temperature=0.0)
    return [("greedy", [3, 4, 5, 6], SamplingParams(**greedy)),
            ("seeded", [7, 8, 9], SamplingParams(max_tokens=12, ignore_eos=True, temperature=0.9,
                                                 top_k=20, seed=11)),
            ("shares-prefix", PREFIX + [99, 98], SamplingParams(**greedy)),
            ("two-choices", [10, 11], SamplingParams(max_tokens=8, ignore_eos=True, temperature=0.7,
                                                     seed=5, n=2))]


def _run(llm: LLM, with_culprit: bool, culprit_first: bool = True) -> dict[str, list]:
    """First, the victim sharing the culprit's prefix takes the culprit's freshly
    registered blocks as cached; last, the culprit takes the victim's."""
    engine = llm.engine
    requests = [(rid, ids, params) for rid, ids, params in _victims()]
    if with_culprit:
        culprit = (CULPRIT, PREFIX + [7], SamplingParams(max_tokens=12, ignore_eos=True, temperature=0.0))
        requests.insert(0 if culprit_first else len(requests), culprit)
    for rid, ids, params in requests:
        engine.add_request(rid, {"prompt_token_ids": ids}, params)
    final = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                final[out.request_id] = [(c.token_ids, c.finish_reason) for c in out.outputs]
    assert_all_blocks_free(llm)
    return final


def test_a_fault_in_one_sampling_row_fails_that_request_only(llm, monkeypatch):
    llm.engine.reset_prefix_cache()
    reference = _run(llm, with_culprit=False)
    real_build = sampler_module.SamplingBatch.build.__func__

    def build(cls, rows, *args, **kwargs):
        if CULPRIT in rows.request_ids:
            raise IndexError("index 100000 is out of bounds for dimension 1")
        return real_build(cls, rows, *args, **kwargs)

    monkeypatch.setattr(sampler_module.SamplingBatch, "build", classmethod(build))
    llm.engine.reset_prefix_cache()
    got = _run(llm, with_culprit=True)
    assert got.pop(CULPRIT) == [([], "error")]
    assert got == reference


@pytest.mark.parametrize("culprit_first", [True, False])
def test_a_fault_that_names_no_request_is_narrowed_down(llm, monkeypatch, culprit_first):
    """A failure the runner cannot tie to a row (here, the forward pass of any step
    holding the culprit): each request of the failed step runs alone once, and only
    the one that fails alone is failed."""
    llm.engine.reset_prefix_cache()
    reference = _run(llm, with_culprit=False)
    runner = llm.engine.runner
    real_launch = runner.launch
    failures = []

    def launch(sched, prev=None):
        if any(s.request_id == CULPRIT for s in sched.scheduled):
            failures.append(len(sched.scheduled))
            raise RuntimeError("an illegal memory access was encountered")
        return real_launch(sched, prev)

    monkeypatch.setattr(runner, "launch", launch)
    llm.engine.reset_prefix_cache()
    got = _run(llm, with_culprit=True, culprit_first=culprit_first)
    assert got.pop(CULPRIT) == [([], "error")]
    assert got == reference
    assert failures[0] > 1 and failures[-1] == 1   # the batch, then the culprit alone


def test_server_side_the_culprit_gets_a_generic_500(llm, monkeypatch):
    """Through the server's engine loop: the culprit's call fails with a 500 that names
    its request id and not the exception; the victims' streams complete."""
    pytest.importorskip("fastapi")
    import asyncio

    from orbitllm.server.async_engine import AsyncEngine, OutputQueue, RequestFailedError, RequestStream
    from orbitllm.server.serving import APIError

    real_build = sampler_module.SamplingBatch.build.__func__

    def build(cls, rows, *args, **kwargs):
        if any(r.startswith(CULPRIT) for r in rows.request_ids):
            raise IndexError("secret internal detail")
        return real_build(cls, rows, *args, **kwargs)

    monkeypatch.setattr(sampler_module.SamplingBatch, "build", classmethod(build))

    async def run() -> list:
        ae = AsyncEngine(llm.engine)
        ae.start()

        async def generate(rid: str, ids: list[int]) -> int:
            sink = OutputQueue(1000, 60.0, lambda: None)
            await ae.add(RequestStream(rid, 0, sink, 1), {"prompt_token_ids": ids},
                         SamplingParams(max_tokens=10, ignore_eos=True, temperature=0.0))
            tokens = 0
            while True:
                _, item = await sink.get(None, rid)
                tokens += sum(len(c.token_ids) for c in item.choices)
                if item.finished:
                    return tokens

        try:
            return await asyncio.gather(generate("v1", [3, 4]), generate(CULPRIT, [5, 6]),
                                        generate("v2", [7, 8]), return_exceptions=True)
        finally:
            await ae.stop()

    results = asyncio.run(run())
    assert results[0] == results[2] == 10
    assert isinstance(results[1], RequestFailedError)
    error = APIError.from_exception(results[1], "cmpl-123")
    assert error.status == 500 and "cmpl-123" in error.info.message
    assert "secret" not in error.info.message
    assert_all_blocks_free(llm)
