"""The offline API: stop conditions, logprobs, seeds, chat, detokenization, bad input."""
from __future__ import annotations

import pytest
import torch

from conftest import assert_all_blocks_free
from orbitllm import LLM, SamplingParams
from orbitllm.engine.detokenizer import IncrementalDetokenizer
from orbitllm.models.errors import ModelLoadError


@pytest.fixture(scope="module")
def llm(tiny_models):
    return LLM(tiny_models["qwen2"], num_kv_blocks=128, max_model_len=256)


@pytest.fixture(scope="module")
def hf(tiny_models):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(tiny_models["qwen2"], dtype=torch.float32)


GREEDY = dict(temperature=0, ignore_eos=True)


def test_string_prompts_in_input_order(llm):
    prompts = ["The quick brown fox", "def add(a, b):", "Paged attention"]
    outs = llm.generate(prompts, SamplingParams(max_tokens=5, **GREEDY), use_tqdm=False)
    assert [o.prompt for o in outs] == prompts
    tok = llm.get_tokenizer()
    assert [o.prompt_token_ids for o in outs] == [tok.encode(p) for p in prompts]
    for o in outs:
        assert len(o.outputs[0].token_ids) == 5 and o.outputs[0].finish_reason == "length"
        assert o.outputs[0].text == tok.decode(o.outputs[0].token_ids, skip_special_tokens=True)
    assert_all_blocks_free(llm)


def test_stop_string_split_across_tokens(llm):
    prompt = "The quick brown fox"
    base = llm.generate(prompt, SamplingParams(max_tokens=24, **GREEDY), use_tqdm=False)[0].outputs[0]
    tok = llm.get_tokenizer()
    pieces = [tok.decode([t]) for t in base.token_ids]
    # A stop string made of the end of one token's text and the start of the next.
    i = next(i for i in range(1, len(pieces) - 1) if len(pieces[i]) >= 1 and len(pieces[i + 1]) >= 1
             and pieces[i].strip() and pieces[i + 1].strip())
    stop = pieces[i][-1:] + pieces[i + 1][:1]
    text_before = "".join(pieces[:i]) + pieces[i][:-1]
    expected = base.text[:base.text.find(stop)]
    out = llm.generate(prompt, SamplingParams(max_tokens=24, stop=[stop], **GREEDY), use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == expected and stop not in out.text
    assert expected.startswith(text_before[:len(expected)])
    kept = llm.generate(prompt, SamplingParams(max_tokens=24, stop=[stop], include_stop_str_in_output=True,
                                               **GREEDY), use_tqdm=False)[0].outputs[0]
    assert kept.text == expected + stop
    assert_all_blocks_free(llm)


def test_stop_token_ids_max_and_min_tokens(llm):
    base = llm.generate("Bonjour", SamplingParams(max_tokens=10, **GREEDY), use_tqdm=False)[0].outputs[0]
    target = base.token_ids[3]
    first = base.token_ids.index(target)
    out = llm.generate("Bonjour", SamplingParams(max_tokens=10, stop_token_ids=[target], **GREEDY),
                       use_tqdm=False)[0].outputs[0]
    assert out.token_ids == base.token_ids[:first + 1] and out.stop_reason == target
    eos = llm.get_tokenizer().eos_token_id
    out = llm.generate("Bonjour", SamplingParams(max_tokens=6, min_tokens=6, temperature=0,
                                                 stop_token_ids=[eos]), use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 6 and eos not in out.token_ids
    assert_all_blocks_free(llm)


def test_logprobs_match_transformers(llm, hf):
    prompt = "Continuous batching lets"
    out = llm.generate(prompt, SamplingParams(max_tokens=4, logprobs=3, prompt_logprobs=2, **GREEDY),
                       use_tqdm=False)[0]
    ids = out.prompt_token_ids + out.outputs[0].token_ids
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].log_softmax(-1)
    n_prompt = len(out.prompt_token_ids)
    for j, entry in enumerate(out.outputs[0].logprobs):
        tok = out.outputs[0].token_ids[j]
        row = ref[n_prompt - 1 + j]
        assert entry[tok].logprob == pytest.approx(row[tok].item(), abs=1e-4)
        assert entry[tok].rank == 1
        top = row.topk(3)
        for lp, tid in zip(top.values.tolist(), top.indices.tolist()):
            assert entry[tid].logprob == pytest.approx(lp, abs=1e-4)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == n_prompt
    for j in range(1, n_prompt):
        tok = out.prompt_token_ids[j]
        assert out.prompt_logprobs[j][tok].logprob == pytest.approx(ref[j - 1, tok].item(), abs=1e-4)
    assert out.outputs[0].cumulative_logprob == pytest.approx(
        sum(e[t].logprob for e, t in zip(out.outputs[0].logprobs, out.outputs[0].token_ids)))
    assert_all_blocks_free(llm)


def _greedy_reference(hf, prompt_ids: list[int], n: int, rep=1.0, pres=0.0, freq=0.0) -> list[int]:
    """Greedy tokens under penalties, the slow obvious way: repetition over prompt +
    output (divide positive logits, multiply negative ones), presence and frequency
    over the output."""
    ids, out = list(prompt_ids), []
    for _ in range(n):
        with torch.no_grad():
            logits = hf(torch.tensor([ids])).logits[0, -1].clone()
        for t in set(ids):
            logits[t] = logits[t] / rep if logits[t] > 0 else logits[t] * rep
        for t in set(out):
            logits[t] -= freq * out.count(t) + pres
        out.append(int(logits.argmax()))
        ids.append(out[-1])
    return out


@pytest.mark.parametrize("overlap", [False, True])
def test_penalties_match_a_reference_beside_plain_rows(llm, hf, overlap):
    """Penalty rows read the host's token history (so an overlapped step drains first);
    a plain greedy row in the same batch is untouched by them."""
    prompts = ["The quick brown fox", "Paged attention"]   # the first repeats a token unpenalized
    penalized = SamplingParams(max_tokens=8, repetition_penalty=1.8, presence_penalty=0.5,
                               frequency_penalty=0.7, **GREEDY)
    plain = SamplingParams(max_tokens=8, **GREEDY)
    llm.engine.overlap = overlap
    try:
        outs = llm.generate(prompts, [penalized, plain], use_tqdm=False)
    finally:
        llm.engine.overlap = False
    ids = [o.prompt_token_ids for o in outs]
    assert outs[0].outputs[0].token_ids == _greedy_reference(hf, ids[0], 8, 1.8, 0.5, 0.7)
    assert outs[1].outputs[0].token_ids == _greedy_reference(hf, ids[1], 8)
    assert outs[0].outputs[0].token_ids != _greedy_reference(hf, ids[0], 8)   # the penalties bite
    assert_all_blocks_free(llm)


def test_prompt_logprobs_with_chunked_prefill(tiny_models, llm):
    small = LLM(tiny_models["qwen2"], num_kv_blocks=64, max_num_batched_tokens=5)
    params = SamplingParams(max_tokens=2, prompt_logprobs=1, **GREEDY)
    prompt = "Paged attention stores keys and values in fixed-size blocks."
    a = small.generate(prompt, params, use_tqdm=False)[0].prompt_logprobs
    b = llm.generate(prompt, params, use_tqdm=False)[0].prompt_logprobs
    assert len(a) == len(b)
    for x, y in zip(a[1:], b[1:]):
        assert x.keys() == y.keys()
        for k in x:
            assert x[k].logprob == pytest.approx(y[k].logprob, abs=1e-4)
    assert_all_blocks_free(small)


def test_seeded_sampling_is_reproducible(llm):
    params = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=42, ignore_eos=True)
    a = llm.generate(["Hello there", "def"], params, use_tqdm=False)
    b = llm.generate(["def", "Hello there"], params, use_tqdm=False)
    assert a[0].outputs[0].token_ids == b[1].outputs[0].token_ids
    assert a[1].outputs[0].token_ids == b[0].outputs[0].token_ids
    other = llm.generate("Hello there", SamplingParams(max_tokens=12, temperature=1.0, seed=43,
                                                       ignore_eos=True), use_tqdm=False)[0]
    assert other.outputs[0].token_ids != a[0].outputs[0].token_ids
    many = llm.generate("Hello there", SamplingParams(n=4, max_tokens=8, temperature=1.0, seed=1,
                                                      ignore_eos=True), use_tqdm=False)[0]
    again = llm.generate("Hello there", SamplingParams(n=4, max_tokens=8, temperature=1.0, seed=1,
                                                       ignore_eos=True), use_tqdm=False)[0]
    assert [o.token_ids for o in many.outputs] == [o.token_ids for o in again.outputs]
    assert len({tuple(o.token_ids) for o in many.outputs}) > 1
    assert_all_blocks_free(llm)


def test_chat_uses_the_template(llm):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    out = llm.chat(msgs, SamplingParams(max_tokens=3, **GREEDY), use_tqdm=False)[0]
    tok = llm.get_tokenizer()
    text = tok.decode(out.prompt_token_ids)
    assert text.endswith("<|im_start|>assistant\n") and "<|im_start|>system\nBe brief." in text
    two = llm.chat([msgs, msgs[1:]], SamplingParams(max_tokens=3, **GREEDY), use_tqdm=False)
    assert len(two) == 2 and two[0].outputs[0].token_ids == out.outputs[0].token_ids


def test_incremental_detokenization_of_multibyte_text(llm):
    tok = llm.get_tokenizer()
    text = "Grüße aus München! 日本語のテキスト。Très bien"
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok, [], True, [], False)
    seen = []
    for t in ids:
        detok.add_token(t)
        seen.append(detok.text)
        assert "\ufffd" not in detok.text
    detok.flush()
    assert detok.text == text
    assert all(text.startswith(s) for s in seen)


def test_priority_runs_urgent_requests_first(tiny_models):
    small = LLM(tiny_models["qwen2"], num_kv_blocks=64, max_num_seqs=1, scheduling_policy="priority")
    params = SamplingParams(max_tokens=2, **GREEDY)
    for i, prio in enumerate([5, 0, 9]):
        small.engine.add_request(f"r{i}", {"prompt_token_ids": [5, 6, 7]}, params, priority=prio)
    order = []
    while small.engine.has_unfinished_requests():
        order += [o.request_id for o in small.engine.step() if o.finished]
    assert order == ["r1", "r0", "r2"]
    assert_all_blocks_free(small)


@pytest.mark.parametrize("prompt,params,field", [
    ("", SamplingParams(), "prompt"),
    ({"prompt_token_ids": [1] * 300}, SamplingParams(), "prompt"),
    ({"prompt_token_ids": [10**7]}, SamplingParams(), "prompt_token_ids"),
])
def test_bad_requests_raise_and_engine_keeps_serving(llm, prompt, params, field):
    with pytest.raises(ValueError, match=field):
        llm.generate(prompt, params, use_tqdm=False)
    ok = llm.generate("still fine", SamplingParams(max_tokens=2, **GREEDY), use_tqdm=False)[0]
    assert len(ok.outputs[0].token_ids) == 2
    assert_all_blocks_free(llm)


@pytest.mark.parametrize("kwargs,field", [
    ({"max_tokens": 0}, "max_tokens"), ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"),
    ({"temperature": -1}, "temperature"), ({"n": 0}, "n"), ({"min_p": 2}, "min_p"),
    ({"top_k": -5}, "top_k"), ({"stop": [""]}, "stop"), ({"repetition_penalty": 0}, "repetition_penalty"),
])
def test_bad_sampling_params_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_unknown_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="model"):
        LLM(str(tmp_path / "nope"))
    (tmp_path / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}')
    with pytest.raises(ModelLoadError, match="unsupported architecture"):
        LLM(str(tmp_path))
    with pytest.raises(TypeError, match="bogus"):
        LLM(str(tmp_path), bogus=1)


def test_overlapped_scheduling_gives_identical_results(tiny_models):
    """Seeds, stop strings, max/min tokens and n>1 behave the same when step n+1
    is launched before step n's tokens are read back."""
    prompts = ["The quick brown fox", "def add(a, b):", "Bonjour"]
    params = [SamplingParams(max_tokens=9, temperature=0.9, seed=7, n=2, ignore_eos=True),
              SamplingParams(max_tokens=12, temperature=0, stop=["e"], min_tokens=2),
              SamplingParams(max_tokens=5, temperature=1.0, seed=3, logprobs=2)]
    results = []
    for overlap in (False, True):
        llm = LLM(tiny_models["qwen2"], num_kv_blocks=64)
        llm.engine.overlap = overlap
        outs = llm.generate(prompts, params, use_tqdm=False)
        results.append([[(c.token_ids, c.text, c.finish_reason) for c in o.outputs] for o in outs])
        assert_all_blocks_free(llm)
    assert results[0] == results[1]
