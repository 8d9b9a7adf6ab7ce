"""Logit bias, allowed token ids, bad words and grammar-constrained output: the sampler's
masks against a plain torch reference, the offline API with xgrammar, and the server's
``response_format`` / ``structured_outputs`` / ``guided_*`` fields with the openai client."""
from __future__ import annotations

import json
import re
import time

import numpy as np
import pytest
import torch

from conftest import assert_all_blocks_free
from orbitllm import LLM, SamplingParams
from orbitllm.layers.sampler import Sampler, SamplingBatch, SamplingRows
from orbitllm.sampling_params import StructuredOutputsParams

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("xgrammar")

CPU = torch.device("cpu")
V = 40


def _rows(params, histories=None, num_prompt=None, bitmasks=None) -> SamplingRows:
    n = len(params)
    histories = histories or [None] * n
    return SamplingRows([str(i) for i in range(n)], params, [None] * n, [0] * n, histories,
                        num_prompt or [0] * n, bitmasks)


def _pack(allowed: set[int], vocab: int) -> np.ndarray:
    """A packed int32 bitmask as xgrammar lays it out: bit j of word w is token 32w + j."""
    bits = np.zeros(((vocab + 31) // 32) * 32, np.uint8)
    bits[sorted(allowed)] = 1
    words = np.packbits(bits.reshape(-1, 32)[:, ::-1], axis=1).view(">u4").astype(np.uint32)
    return words.ravel().view(np.int32)


def _reference(logits: torch.Tensor, params: list[SamplingParams], histories, num_prompt,
               allowed_sets) -> torch.Tensor:
    """The edited logits, row by row in plain torch: bias added, everything outside the
    allowed ids and the grammar's set at -inf, bad words' last tokens at -inf when the
    output ends with the rest of the word."""
    want = logits.clone()
    for b, p in enumerate(params):
        for t, bias in (p.logit_bias or {}).items():
            want[b, t] += bias
        if p.allowed_token_ids:
            keep = torch.zeros(logits.shape[1], dtype=torch.bool)
            keep[p.allowed_token_ids] = True
            want[b, ~keep] = float("-inf")
        out = (histories[b] or [])[num_prompt[b]:]
        for word in p.bad_words_token_ids:
            if len(word) == 1 or (len(out) >= len(word) - 1 and out[len(out) - len(word) + 1:] == word[:-1]):
                want[b, word[-1]] = float("-inf")
        if allowed_sets[b] is not None:
            keep = torch.zeros(logits.shape[1], dtype=torch.bool)
            keep[sorted(allowed_sets[b])] = True
            want[b, ~keep] = float("-inf")
    return want


def _mask_case(seed: int):
    rng = np.random.default_rng(seed)
    params, histories, num_prompt, sets = [], [], [], []
    for b in range(6):
        kind = b % 6
        p = SamplingParams(temperature=0)
        history, grammar = None, None
        if kind == 1:
            p = SamplingParams(temperature=0, logit_bias={int(t): float(rng.uniform(-100, 100))
                                                           for t in rng.choice(V, 5, replace=False)})
        elif kind == 2:
            p = SamplingParams(temperature=0, allowed_token_ids=[int(t) for t in rng.choice(V, 4, replace=False)])
        elif kind == 3:
            p = SamplingParams(temperature=0, bad_words=["w"])
            words = [[int(rng.integers(V))], [7, 8, int(rng.integers(V))], [9, 10]]
            p.bad_words_token_ids = words
            history = [1, 2, 3] + ([7, 8] if rng.random() < 0.5 else [8, 7]) + ([9] if rng.random() < 0.5 else [])
        elif kind == 4:
            p = SamplingParams(temperature=0, structured_outputs=StructuredOutputsParams(regex="a"))
            grammar = {int(t) for t in rng.choice(V, 6, replace=False)}
        elif kind == 5:
            p = SamplingParams(temperature=0, logit_bias={3: 50.0}, allowed_token_ids=[3, 4, 5, 30])
            grammar = {4, 5, 30, 31}
        params.append(p)
        histories.append(history)
        num_prompt.append(3 if history else 0)
        sets.append(grammar)
    return params, histories, num_prompt, sets


@pytest.mark.parametrize("seed", range(4))
def test_masks_match_reference_greedy(seed):
    """Greedy draws equal the reference argmax, and rows without masks are untouched."""
    params, histories, num_prompt, sets = _mask_case(seed)
    bitmasks = [None if s is None else _pack(s, V) for s in sets]
    batch = SamplingBatch.build(_rows(params, histories, num_prompt, bitmasks), V, CPU, set())
    sampler = Sampler(0, CPU)
    for trial in range(10):
        logits = torch.randn(len(params), V, generator=torch.Generator().manual_seed(seed * 100 + trial)) * 3
        want = _reference(logits, params, histories, num_prompt, sets)
        given = logits.clone()
        out = sampler(given, batch, greedy_ids=logits.argmax(-1))
        assert out.token_ids.tolist() == want.argmax(-1).tolist()
        assert torch.equal(given, logits)   # the caller's logits are not edited in place


def test_masks_sampled_distribution():
    """With temperature 1, the draws follow softmax of the reference's edited logits
    (total variation over 4000 draws per row, and nothing outside the allowed sets)."""
    params, histories, num_prompt, sets = _mask_case(11)
    params = [SamplingParams(temperature=1.0, logit_bias=p.logit_bias, allowed_token_ids=p.allowed_token_ids,
                             bad_words=p.bad_words, structured_outputs=p.structured_outputs) for p in params]
    for p, q in zip(params, _mask_case(11)[0]):
        p.bad_words_token_ids = q.bad_words_token_ids
    reps = 4000
    rows = _rows([p for p in params for _ in range(reps)], [h for h in histories for _ in range(reps)],
                 [n for n in num_prompt for _ in range(reps)],
                 [None if s is None else _pack(s, V) for s in sets for _ in range(reps)])
    logits = torch.randn(len(params), V, generator=torch.Generator().manual_seed(5))
    want = _reference(logits, params, histories, num_prompt, sets).softmax(-1)
    batch = SamplingBatch.build(rows, V, CPU, set())
    out = Sampler(1, CPU)(logits.repeat_interleave(reps, 0), batch).token_ids.view(len(params), reps)
    for b in range(len(params)):
        freq = torch.bincount(out[b], minlength=V).float() / reps
        assert (freq[want[b] == 0] == 0).all()
        assert 0.5 * (freq - want[b]).abs().sum() < 0.06, b


def test_batch_without_masks_builds_none():
    batch = SamplingBatch.build(_rows([SamplingParams(temperature=0)] * 3), V, CPU, set())
    assert batch.masks is None and batch.banned is None and batch.penalties is None


def test_mask_params_validated():
    for kwargs, field in [({"logit_bias": {"5": 101}}, "logit_bias"), ({"logit_bias": {"x": 1}}, "logit_bias"),
                          ({"logit_bias": {5: float("nan")}}, "logit_bias"),
                          ({"allowed_token_ids": []}, "allowed_token_ids"),
                          ({"allowed_token_ids": [-1]}, "allowed_token_ids"),
                          ({"bad_words": [""]}, "bad_words"), ({"bad_words": "abc"}, "bad_words")]:
        with pytest.raises(ValueError, match=field):
            SamplingParams(**kwargs)
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams(json={}, regex="a")
    with pytest.raises(ValueError, match="structured_outputs.choice"):
        StructuredOutputsParams(choice=[])


# ---- the engine, offline -------------------------------------------------------------

SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "pattern": "^[a-z]{1,8}$"},
                                      "age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["name", "age"]},
    {"type": "object", "properties": {
        "color": {"enum": ["red", "green", "blue"]},
        "point": {"type": "object", "properties": {"x": {"type": "integer", "minimum": -9, "maximum": 9},
                                                   "y": {"type": "boolean"}},
                  "required": ["x", "y"]}},
     "required": ["color", "point"]},
    {"type": "object", "properties": {
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 1, "maxItems": 4},
        "ok": {"type": "boolean"}, "note": {"type": "null"}},
     "required": ["tags", "ok", "note"]},
    {"type": "array", "items": {"type": "object", "properties": {"id": {"type": "integer", "minimum": 0,
                                                                          "maximum": 99}},
                                "required": ["id"]}, "minItems": 1, "maxItems": 3},
]


@pytest.fixture(scope="module")
def llm(tiny_models) -> LLM:
    return LLM(tiny_models["qwen2"], max_model_len=256, num_kv_blocks=256)


def test_offline_json_regex_choice_mixed_with_free(llm):
    """One batch: every schema (sampled, two seeds each), a regex, a choice and free
    requests. Constrained outputs validate; the free ones equal their run alone."""
    free = SamplingParams(temperature=0, max_tokens=12)
    alone = [o.outputs[0].token_ids for o in llm.generate(["The quick", "Bonjour"], free, use_tqdm=False)]
    params = [SamplingParams(temperature=1.0, seed=s, max_tokens=120,
                             structured_outputs=StructuredOutputsParams(json=schema))
              for schema in SCHEMAS for s in (1, 2)]
    params += [SamplingParams(temperature=1.0, seed=3, max_tokens=40,
                              structured_outputs=StructuredOutputsParams(regex=r"[a-c]{2,5}@x\.(com|org)")),
               SamplingParams(temperature=1.0, seed=4, max_tokens=40,
                              structured_outputs=StructuredOutputsParams(choice=["yes", "no", "maybe not"])),
               SamplingParams(temperature=1.0, seed=5, max_tokens=60,
                              structured_outputs=StructuredOutputsParams(json_object=True)),
               free, free]
    prompts = ["The quick brown fox"] * (len(params) - 2) + ["The quick", "Bonjour"]
    outs = llm.generate(prompts, params, use_tqdm=False)
    for i, schema in enumerate(s for s in SCHEMAS for _ in (1, 2)):
        c = outs[i].outputs[0]
        assert c.finish_reason == "stop", c.text
        jsonschema.validate(json.loads(c.text), schema)
    k = 2 * len(SCHEMAS)
    assert re.fullmatch(r"[a-c]{2,5}@x\.(com|org)", outs[k].outputs[0].text)
    assert outs[k + 1].outputs[0].text in ("yes", "no", "maybe not")
    obj = outs[k + 2].outputs[0]
    if obj.finish_reason == "stop":
        assert isinstance(json.loads(obj.text), dict)
    assert [o.outputs[0].token_ids for o in outs[-2:]] == alone
    assert llm.engine.structured.num_active == 0
    assert_all_blocks_free(llm)


def test_overlapped_scheduling_gives_the_same_constrained_outputs(llm, monkeypatch):
    """With the pipeline overlapped (forced on here; the GPU default), constrained masks
    are filled after the next step's forward is queued: same tokens as without overlap,
    and valid JSON for every schema."""
    params = [SamplingParams(temperature=1.0, seed=s, max_tokens=120,
                             structured_outputs=StructuredOutputsParams(json=SCHEMAS[s % len(SCHEMAS)]))
              for s in range(4)] + [SamplingParams(temperature=1.0, seed=9, max_tokens=20, ignore_eos=True)] * 2
    prompts = ["The quick brown fox", "Bonjour", "def add(a, b):", "0123", "Paged attention", "The lazy dog"]
    plain = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    late = []
    launch = llm.engine.runner.launch
    monkeypatch.setattr(llm.engine.runner, "launch",
                        lambda sched, prev=None: late.append(sched.late_bitmasks is not None) or launch(sched, prev))
    llm.engine.overlap = True
    try:
        outs = llm.generate(prompts, params, use_tqdm=False)
    finally:
        llm.engine.overlap = False
        while llm.engine.has_unfinished_requests():   # the last step, still in flight
            llm.engine.step()
    assert [o.outputs[0].token_ids for o in outs] == plain
    assert sum(late) > 20   # most steps filled their masks late, inside launch
    for s, o in enumerate(outs[:4]):
        jsonschema.validate(json.loads(o.outputs[0].text), SCHEMAS[s % len(SCHEMAS)])
    assert llm.engine.structured.num_active == 0
    assert_all_blocks_free(llm)


def test_offline_logit_bias_allowed_bad_words(llm):
    """Greedy: a +100 bias makes its token every token; allowed ids bound the output;
    a banned word never appears while the same request without it shows it."""
    tok = llm.get_tokenizer()
    out = llm.generate("The quick", SamplingParams(temperature=0, max_tokens=6, logit_bias={17: 100}),
                       use_tqdm=False)[0].outputs[0]
    assert out.token_ids == [17] * 6
    allowed = [5, 9, 23]
    out = llm.generate("The quick", SamplingParams(temperature=1.0, seed=0, max_tokens=20,
                                                   allowed_token_ids=allowed), use_tqdm=False)[0].outputs[0]
    assert set(out.token_ids) <= set(allowed)
    base = llm.generate("The quick", SamplingParams(temperature=0, max_tokens=20), use_tqdm=False)[0].outputs[0]
    # Two tokens the greedy output contains that are a word of their own (they re-encode).
    j = next(j for j in range(len(base.token_ids) - 1)
             if tok.encode(tok.decode(base.token_ids[j:j + 2]).lstrip(), add_special_tokens=False)
             == base.token_ids[j:j + 2])
    ids = base.token_ids[j:j + 2]
    banned = llm.generate("The quick", SamplingParams(temperature=0, max_tokens=20,
                                                      bad_words=[tok.decode(ids)]),
                          use_tqdm=False)[0].outputs[0]
    assert all(banned.token_ids[i:i + 2] != ids for i in range(len(banned.token_ids)))
    assert banned.token_ids[:j + 1] == base.token_ids[:j + 1] and banned.token_ids != base.token_ids
    assert_all_blocks_free(llm)


def test_offline_bad_input(llm):
    vocab = llm.engine.vocab_size
    for params, field in [(SamplingParams(logit_bias={vocab: 1.0}), "logit_bias"),
                          (SamplingParams(allowed_token_ids=[vocab + 3]), "allowed_token_ids"),
                          (SamplingParams(structured_outputs=StructuredOutputsParams(json={"type": "foo"})),
                           "structured_outputs.json"),
                          (SamplingParams(structured_outputs=StructuredOutputsParams(regex="(a")),
                           "structured_outputs.regex"),
                          (SamplingParams(structured_outputs=StructuredOutputsParams(grammar="root ::= ")),
                           "structured_outputs.grammar")]:
        with pytest.raises(ValueError, match=re.escape(field)):
            llm.generate("x", params, use_tqdm=False)
    assert llm.engine.structured.num_active == 0
    assert_all_blocks_free(llm)


def test_compiled_grammars_are_cached_and_bounded(llm):
    from orbitllm.engine.structured_output import GrammarCompiler
    compiler = GrammarCompiler(llm.get_tokenizer(), llm.engine.vocab_size, llm.engine.eos_token_ids,
                               cache_size=2)
    a = compiler.compile(StructuredOutputsParams(json={"type": "integer"}))
    assert compiler.compile(StructuredOutputsParams(json={"type": "integer"})) is a
    assert compiler.compile(StructuredOutputsParams(json='{"type":"integer"}')) is not a   # other text
    compiler.compile(StructuredOutputsParams(regex="x+"))
    compiler.compile(StructuredOutputsParams(regex="y+"))
    assert len(compiler) == 2
    assert compiler.compile(StructuredOutputsParams(json={"type": "integer"})) is not a   # evicted


# ---- the server --------------------------------------------------------------------------

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")


def _kv_free(server) -> None:
    deadline = time.monotonic() + 5
    while server.metric("kv_cache_usage_perc") != 0.0:
        assert time.monotonic() < deadline, "KV blocks still held"
        time.sleep(0.05)
    assert server.metric("num_requests_running") == 0


@pytest.fixture(scope="module")
def client(tools_server):
    return openai.OpenAI(base_url=tools_server.v1, api_key="test-key", max_retries=0)


def test_server_json_schema_chat_and_completions(tools_server, client):
    """response_format json_schema (chat, streamed and not) and vLLM's guided_json /
    structured_outputs (completions): every schema's output validates."""
    for i, schema in enumerate(SCHEMAS):
        fmt = {"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema}}
        r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Data?"}],
                                           response_format=fmt, max_tokens=120, seed=i, temperature=1.0)
        jsonschema.validate(json.loads(r.choices[0].message.content), schema)
        assert r.choices[0].finish_reason == "stop"
        chunks = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Go"}],
                                                response_format=fmt, max_tokens=120, seed=i + 9,
                                                temperature=1.0, stream=True)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        jsonschema.validate(json.loads(text), schema)
        extra = {"guided_json": schema} if i % 2 else {"structured_outputs": {"json": schema}}
        c = client.completions.create(model="tiny", prompt="The quick brown fox", max_tokens=120, seed=i,
                                      temperature=1.0, extra_body=extra)
        jsonschema.validate(json.loads(c.choices[0].text), schema)
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "obj"}],
                                       response_format={"type": "json_object"}, max_tokens=200, seed=1)
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    _kv_free(tools_server)


def test_server_regex_choice_grammar(tools_server, client):
    regex = r"\d{3}-[A-Z]{2}"
    for body, check in [({"guided_regex": regex}, lambda t: re.fullmatch(regex, t)),
                        ({"structured_outputs": {"regex": regex}}, lambda t: re.fullmatch(regex, t)),
                        ({"guided_choice": ["cat", "dog", "sea lion"]}, lambda t: t in ("cat", "dog", "sea lion")),
                        ({"structured_outputs": {"choice": ["up", "down"]}}, lambda t: t in ("up", "down")),
                        ({"guided_grammar": 'root ::= "a" ("b" | "c")+ "."'},
                         lambda t: re.fullmatch(r"a[bc]+\.", t))]:
        c = client.completions.create(model="tiny", prompt="Answer:", max_tokens=30, temperature=1.0,
                                      seed=3, extra_body=body)
        assert check(c.choices[0].text), (body, c.choices[0].text)
        r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                           max_tokens=30, temperature=1.0, seed=4, extra_body=body)
        assert check(r.choices[0].message.content), (body, r.choices[0].message.content)
    _kv_free(tools_server)


def test_server_logit_bias_allowed_bad_words(tools_server, client):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tools_server.model_path)
    c = client.completions.create(model="tiny", prompt="The quick", max_tokens=5, temperature=0,
                                  logit_bias={"17": 100})
    assert c.choices[0].text == tok.decode([17] * 5)
    c = client.completions.create(model="tiny", prompt="The quick", max_tokens=8, temperature=1.0, seed=2,
                                  extra_body={"allowed_token_ids": [5, 9]})
    assert set(c.choices[0].text) <= set(tok.decode([5]) + tok.decode([9]))
    # A one-token word, pushed by a +100 bias: banned, it never appears.
    t = next(t for t in range(100, 400) if tok.decode([t]).isalpha() and len(tok.decode([t])) > 2
             and tok.encode(tok.decode([t]), add_special_tokens=False) == [t])
    word = tok.decode([t])
    c = client.completions.create(model="tiny", prompt="The quick", max_tokens=4, temperature=0,
                                  logit_bias={str(t): 100}, extra_body={"bad_words": [word]})
    assert word not in c.choices[0].text and len(c.choices[0].text) > 0
    _kv_free(tools_server)


BAD_REQUESTS = [
    ("invalid schema", "/chat/completions",
     {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}}},
     "response_format"),
    ("json_schema without schema", "/chat/completions",
     {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
    ("bad regex", "/completions", {"guided_regex": "(("}, "guided_regex"),
    ("bad grammar", "/completions", {"structured_outputs": {"grammar": "root ::= "}}, "structured_outputs"),
    ("two constraints", "/completions", {"guided_regex": "a", "guided_choice": ["b"]}, "guided_choice"),
    ("empty choice", "/completions", {"guided_choice": []}, "guided_choice"),
    ("bias out of range", "/completions", {"logit_bias": {"5": 150}}, "logit_bias"),
    ("bias key not an id", "/completions", {"logit_bias": {"x": 1}}, "logit_bias"),
    ("bias id outside vocab", "/chat/completions", {"logit_bias": {"999999": 1}}, "logit_bias"),
    ("allowed outside vocab", "/completions", {"allowed_token_ids": [999999]}, "allowed_token_ids"),
    ("empty bad word", "/completions", {"bad_words": [""]}, "bad_words"),
]


@pytest.mark.parametrize("name,path,extra,param", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_server_bad_constraints_are_400(tools_server, name, path, extra, param):
    body = {"model": "tiny", "max_tokens": 4, **extra}
    body.update({"messages": [{"role": "user", "content": "x"}]} if "chat" in path else {"prompt": "x"})
    with httpx.Client(base_url=tools_server.v1, timeout=30,
                      headers={"Authorization": "Bearer test-key"}) as http:
        r = http.post(path, json=body)
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == param and error["type"] == "invalid_request_error", error
        assert param.split(".")[0] in error["message"]
        ok = http.post("/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2})
        assert ok.status_code == 200


@pytest.mark.gpu
def test_gpu_constrained_batch_with_overlap_matches_without(tiny_models):
    """On CUDA: xgrammar's Triton mask kernel, the masks filled late under overlapped
    scheduling (the default there), the same tokens as with overlap off."""
    params = [SamplingParams(temperature=1.0, seed=s, max_tokens=120,
                             structured_outputs=StructuredOutputsParams(json=SCHEMAS[s % len(SCHEMAS)]))
              for s in range(8)] + [SamplingParams(temperature=1.0, seed=3, max_tokens=40, ignore_eos=True)] * 8
    prompts = ["The quick brown fox"] * len(params)
    runs = []
    for overlap in (True, False):
        llm = LLM(tiny_models["qwen2"], device="cuda", max_model_len=256, num_kv_blocks=256,
                  async_scheduling=overlap)
        assert llm.engine.overlap == overlap
        outs = llm.generate(prompts, params, use_tqdm=False)
        while llm.engine.has_unfinished_requests():
            llm.engine.step()
        for s, o in enumerate(outs[:8]):
            jsonschema.validate(json.loads(o.outputs[0].text), SCHEMAS[s % len(SCHEMAS)])
        assert_all_blocks_free(llm)
        runs.append([o.outputs[0].token_ids for o in outs])
        llm.shutdown()
    assert runs[0] == runs[1]
