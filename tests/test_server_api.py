"""The server's OpenAI / vLLM surface beyond chat and completions (issue 22): the extra
request fields, unknown and unsupported fields, /tokenize, /detokenize, /ready, usage
details, and the one-line error for a missing server package. One server subprocess
with a tiny random model, driven by the official ``openai`` client, checked against
the offline API."""
from __future__ import annotations

import math
import subprocess
import sys

import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from orbitllm import LLM, SamplingParams  # noqa: E402
from test_server import MAX_MODEL_LEN, MODEL, PROMPTS, ServerProcess, _wait_for  # noqa: E402
from conftest import assert_all_blocks_free  # noqa: E402


@pytest.fixture(scope="module")
def model_path(tiny_models) -> str:
    return tiny_models["llama"]


@pytest.fixture(scope="module")
def server(model_path, tmp_path_factory):
    srv = ServerProcess(model_path, tmp_path_factory.mktemp("server_api"), "--served-model-name",
                        MODEL, "alias-b").wait_ready()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def llm(model_path) -> LLM:
    return LLM(model_path, max_model_len=MAX_MODEL_LEN, num_kv_blocks=512)


def _offline(llm, prompt, **params):
    return llm.generate(prompt, SamplingParams(**params), use_tqdm=False)[0]


def test_models_aliases_ready_health(server, client):
    assert [m.id for m in client.models.list()] == [MODEL, "alias-b"]
    assert all(m.root == MODEL for m in client.models.list())
    r = client.completions.create(model="alias-b", prompt="hi", max_tokens=2)
    assert r.model == "alias-b"
    assert httpx.get(server.url + "/ready").status_code == 200
    assert httpx.get(server.url + "/health").status_code == 200


def test_served_name_is_the_folder_or_gguf_name(tmp_path):
    from orbitllm.server.cli import served_name
    folder = tmp_path / "Qwen3-8B"
    folder.mkdir()
    (tmp_path / "model-q4.gguf").write_bytes(b"")
    assert served_name(str(folder)) == "Qwen3-8B"
    assert served_name(str(tmp_path / "model-q4.gguf")) == "model-q4"
    assert served_name("org/name") == "org/name"
    # The model argument as given is accepted too (vLLM's name for it), though not listed.
    from types import SimpleNamespace

    from orbitllm.server.serving import APIError, OpenAIServing, ServerSettings
    serving = SimpleNamespace(settings=ServerSettings(["Qwen3-8B"], model_aliases=[str(folder)]))
    assert OpenAIServing._check_model(serving, str(folder)) == str(folder)
    assert OpenAIServing._check_model(serving, "Qwen3-8B") == "Qwen3-8B"
    with pytest.raises(APIError):
        OpenAIServing._check_model(serving, "other")


def test_tokenize_detokenize_roundtrip(server, llm):
    tok = llm.get_tokenizer()
    r = httpx.post(server.url + "/tokenize", json={"model": MODEL, "prompt": PROMPTS[0]}).json()
    assert r == {"count": len(tok.encode(PROMPTS[0])), "max_model_len": MAX_MODEL_LEN,
                 "tokens": tok.encode(PROMPTS[0])}
    msgs = [{"role": "user", "content": "hi"}]
    chat = httpx.post(server.url + "/tokenize", json={"messages": msgs}).json()
    assert chat["tokens"] == llm.apply_chat_template(msgs)
    back = httpx.post(server.url + "/detokenize", json={"tokens": r["tokens"]}).json()
    assert back == {"prompt": tok.decode(r["tokens"])}
    for path, body, param in [("/tokenize", {}, "prompt"),
                              ("/tokenize", {"prompt": "a", "messages": msgs}, "prompt"),
                              ("/detokenize", {"tokens": [10 ** 6]}, "tokens"),
                              ("/detokenize", {"tokens": ["a"]}, "tokens"),
                              ("/tokenize", {"prompt": "a", "model": "nope"}, "model")]:
        e = httpx.post(server.url + path, json=body)
        assert e.status_code in (400, 404) and e.json()["error"]["param"] == param, (body, e.text)


def test_truncate_prompt_tokens_and_min_tokens(client, llm):
    tok = llm.get_tokenizer()
    ids = tok.encode(PROMPTS[0] + " " + PROMPTS[1])
    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=6, temperature=0,
                                  extra_body={"truncate_prompt_tokens": 4})
    ref = _offline(llm, {"prompt_token_ids": ids[-4:]}, max_tokens=6, temperature=0)
    assert r.usage.prompt_tokens == 4 and r.choices[0].text == ref.outputs[0].text
    # min_tokens holds back a stop token: stop on the first greedy token, but not before 3.
    first = _offline(llm, PROMPTS[0], max_tokens=1, temperature=0).outputs[0].token_ids[0]
    kw = dict(max_tokens=8, temperature=0, stop_token_ids=[first], min_tokens=3)
    ref = _offline(llm, PROMPTS[0], **kw).outputs[0]
    r = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=8, temperature=0,
                                  extra_body={"stop_token_ids": [first], "min_tokens": 3})
    assert len(ref.token_ids) >= 3 and r.usage.completion_tokens == len(ref.token_ids)
    assert r.choices[0].text == ref.text
    bad = httpx.post(client.base_url.join("completions").__str__(),
                     json={"prompt": "hi", "max_tokens": 2, "min_tokens": 3})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "min_tokens"
    bad = httpx.post(client.base_url.join("completions").__str__(),
                     json={"prompt": "hi", "truncate_prompt_tokens": 0})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "truncate_prompt_tokens"


def test_prompt_logprobs_match_offline(client, llm):
    ids = llm.get_tokenizer().encode(PROMPTS[2])
    ref = _offline(llm, PROMPTS[2], max_tokens=1, prompt_logprobs=2).prompt_logprobs
    r = client.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=1,
                                  extra_body={"prompt_logprobs": 2})
    got = r.choices[0].model_extra["prompt_logprobs"]
    assert got[0] is None and len(got) == len(ids) == len(ref)
    for want, have, tid in zip(ref[1:], got[1:], ids[1:]):
        assert set(have) == {str(t) for t in want}
        assert math.isclose(have[str(tid)]["logprob"], want[tid].logprob, abs_tol=1e-4)
    streamed = [c.choices[0].model_extra.get("prompt_logprobs") for c in client.completions.create(
        model=MODEL, prompt=PROMPTS[2], max_tokens=3, stream=True, extra_body={"prompt_logprobs": 2})
        if c.choices]
    assert streamed[0] == got and all(p is None for p in streamed[1:])   # in the first chunk only
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=1, extra_body={"prompt_logprobs": 0})
    assert chat.model_extra["prompt_logprobs"][0] is None
    assert all(len(e) == 1 for e in chat.model_extra["prompt_logprobs"][1:])


def test_best_of_returns_the_highest_cumulative_logprob(client, llm):
    kw = dict(max_tokens=5, temperature=1.0, seed=3, ignore_eos=True, logprobs=0)
    ref = _offline(llm, PROMPTS[3], n=4, **kw).outputs
    ranked = sorted(ref, key=lambda c: c.cumulative_logprob, reverse=True)
    r = client.completions.create(model=MODEL, prompt=PROMPTS[3], n=2, best_of=4, max_tokens=5,
                                  temperature=1.0, seed=3, extra_body={"ignore_eos": True})
    assert [c.text for c in r.choices] == [c.text for c in ranked[:2]]
    assert [c.index for c in r.choices] == [0, 1] and r.choices[0].logprobs is None
    for body in ({"n": 3, "best_of": 2}, {"n": 1, "best_of": 2, "stream": True},
                 {"best_of": 10 ** 6}):
        e = httpx.post(client.base_url.join("completions").__str__(),
                       json={"prompt": "hi", "max_tokens": 2, **body})
        assert e.status_code == 400 and e.json()["error"]["param"] == "best_of", (body, e.text)


def test_cached_tokens_in_usage(client):
    prompt = PROMPTS[4] * 8   # several full blocks
    first = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1)
    second = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert 0 < cached < second.usage.prompt_tokens and cached % 16 == 0


def test_unknown_fields_ignored_and_logged(server, client):
    r = client.completions.create(model=MODEL, prompt="hi", max_tokens=2,
                                  extra_body={"frobnicate": 1, "user": "u-1"})
    assert r.choices[0].text is not None
    assert "ignoring unknown request field(s): 'frobnicate'\n" in server.output()
    for path, body in (("/tokenize", {"prompt": "hi", "gizmo": 1}),
                       ("/detokenize", {"tokens": [1], "gizmo": 1})):
        r = httpx.post(server.url + path, json=body)
        assert r.status_code == 200, r.text
    assert server.output().count("ignoring unknown request field(s): 'gizmo'\n") == 2


@pytest.mark.parametrize("field,value", [
    ("audio", {"voice": "alloy", "format": "wav"}), ("modalities", ["text", "audio"]),
    ("prediction", {"type": "content", "content": "x"}), ("web_search_options", {}),
    ("service_tier", "flex"), ("store", True)])
def test_unsupported_openai_features_are_400(server, field, value):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, field: value}
    r = httpx.post(server.v1 + "/chat/completions", json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text


def test_image_content_part_is_400(server):
    body = {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}], "max_tokens": 2}
    r = httpx.post(server.v1 + "/chat/completions", json=body)
    assert r.status_code == 400 and "image_url" in r.json()["error"]["message"], r.text
    ok = httpx.post(server.v1 + "/chat/completions", json={**body, "messages": [
        {"role": "user", "content": [{"type": "text", "text": "hi"}]}]})
    assert ok.status_code == 200


def test_missing_server_package_is_one_line(model_path):
    code = ("import sys; sys.modules['uvicorn'] = None\n"
            "from orbitllm.cli import main\n"
            f"main(['serve', {model_path!r}])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert r.stderr.strip() == ("orbitllm: error: `orbitllm serve` needs uvicorn, which is not "
                                "installed: pip install uvicorn")


def test_spaces_between_special_tokens(tmp_path):
    """A WordPiece decoder puts spaces between every token, specials included; with the
    option off, special tokens join the text around them."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from orbitllm.engine.detokenizer import IncrementalDetokenizer
    vocab = {"[UNK]": 0, "[SEP]": 1, "hello": 2, "world": 3}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", sep_token="[SEP]")
    ids = [2, 1, 3, 1]

    def run(skip: bool, spaces: bool) -> str:
        d = IncrementalDetokenizer(fast, [], skip, [], False, spaces)
        for t in ids:
            d.add_token(t)
        d.flush()
        return d.text

    assert run(False, True) == "hello [SEP] world [SEP]"
    assert run(False, False) == "hello[SEP]world[SEP]"
    assert run(True, False) == run(True, True) == "hello world"


def test_offline_truncate_prompt_tokens(llm):
    ids = llm.get_tokenizer().encode(PROMPTS[1])
    full = _offline(llm, {"prompt_token_ids": ids[-3:]}, max_tokens=4, temperature=0)
    cut = _offline(llm, {"prompt_token_ids": ids}, max_tokens=4, temperature=0,
                   truncate_prompt_tokens=3)
    assert cut.prompt_token_ids == ids[-3:] and cut.outputs[0].token_ids == full.outputs[0].token_ids
    with pytest.raises(ValueError, match="truncate_prompt_tokens"):
        SamplingParams(truncate_prompt_tokens=0)
    assert_all_blocks_free(llm)


def test_use_beam_search_matches_offline(server, client, llm):
    from orbitllm import BeamSearchParams
    ref = llm.beam_search([PROMPTS[0], PROMPTS[2]], BeamSearchParams(beam_width=3, max_tokens=5))
    r = client.completions.create(model=MODEL, prompt=[PROMPTS[0], PROMPTS[2]], n=2, best_of=3,
                                  max_tokens=5, logprobs=1, extra_body={"use_beam_search": True})
    assert [c.text for c in r.choices] == [s.text for out in ref for s in out.sequences[:2]]
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert all(len(c.logprobs.tokens) == 5 for c in r.choices)
    cum = sum(c.logprobs.token_logprobs[i] for c in r.choices[:1] for i in range(5))
    assert math.isclose(cum, ref[0].sequences[0].cum_logprob, abs_tol=1e-4)
    msgs = [{"role": "user", "content": "hi"}]
    chat = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=4,
                                          extra_body={"use_beam_search": True, "best_of": 2})
    want = llm.beam_search({"prompt_token_ids": llm.apply_chat_template(msgs)},
                           BeamSearchParams(beam_width=2, max_tokens=4))[0].sequences[0]
    assert chat.choices[0].message.content == want.text
    e = httpx.post(server.v1 + "/completions", json={"prompt": "hi", "use_beam_search": True,
                                                     "stream": True})
    assert e.status_code == 400 and e.json()["error"]["param"] == "use_beam_search"
    _wait_for(lambda: server.metric("kv_cache_usage_perc") == 0.0, timeout=2.0)   # all released


# ---- embeddings ------------------------------------------------------------------------

@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_embed_matches_transformers_final_hidden_state(model_path, pooling):
    """Chunked prefill (16 tokens a step) over a longer prompt: mean pooling must sum
    every chunk once."""
    import torch
    from transformers import AutoModelForCausalLM
    llm = LLM(model_path, max_model_len=MAX_MODEL_LEN, num_kv_blocks=64, max_num_batched_tokens=16)
    hf = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    prompts = [PROMPTS[0] * 4, "hi"]
    outs = llm.embed(prompts, pooling=pooling)
    for p, out in zip(prompts, outs):
        ids = llm.get_tokenizer().encode(p)
        with torch.no_grad():
            h = hf.model(torch.tensor([ids])).last_hidden_state[0]
        ref = h[-1] if pooling == "last" else h.mean(0)
        assert torch.allclose(torch.tensor(out.embedding), ref / ref.norm(), atol=1e-5)
    with pytest.raises(ValueError, match="pooling"):
        llm.embed("hi", pooling="cls")
    assert_all_blocks_free(llm)


def test_embeddings_endpoint(server, client, llm):
    import base64

    import numpy as np
    inputs = [PROMPTS[1], PROMPTS[5]]
    ref = [o.embedding for o in llm.embed(inputs)]
    r = client.embeddings.create(model=MODEL, input=inputs)   # the client asks for base64
    assert [d.index for d in r.data] == [0, 1]
    for d, want in zip(r.data, ref):
        assert np.allclose(d.embedding, want, atol=1e-5)
    tok = llm.get_tokenizer()
    assert r.usage.prompt_tokens == sum(len(tok.encode(t)) for t in inputs)
    plain = httpx.post(server.v1 + "/embeddings", json={"input": tok.encode(PROMPTS[1]),
                                                        "encoding_format": "float"}).json()
    assert np.allclose(plain["data"][0]["embedding"], ref[0], atol=1e-5)
    b64 = httpx.post(server.v1 + "/embeddings", json={"input": "x", "encoding_format": "base64"})
    assert len(np.frombuffer(base64.b64decode(b64.json()["data"][0]["embedding"]), "<f4")) == 64
    for body, param in [({"input": "x", "dimensions": 8}, "dimensions"),
                        ({"input": "x", "encoding_format": "int8"}, "encoding_format"),
                        ({"input": []}, "input")]:
        e = httpx.post(server.v1 + "/embeddings", json=body)
        assert e.status_code == 400 and e.json()["error"]["param"] == param, (body, e.text)
    _wait_for(lambda: server.metric("kv_cache_usage_perc") == 0.0, timeout=2.0)
