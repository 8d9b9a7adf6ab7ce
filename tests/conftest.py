"""Shared fixtures: tiny random models of each family, saved in the Hugging Face
layout with a small byte-level BPE tokenizer trained here (no hub access)."""
from __future__ import annotations

import pytest
import torch

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma3"]

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Paged attention stores keys and values in fixed-size blocks.",
    "Continuous batching lets requests join and leave every step.",
    "Bonjour, ça va? Très bien, merci. Grüße aus München! 日本語のテキスト。",
    "def add(a, b):\n    return a + b\n",
    "0123456789 + - * / = ( ) [ ] { } < > ! ? , . ; :",
] * 20


def build_tokenizer(path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   bos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.chat_template = CHATML
    fast.save_pretrained(str(path))
    return fast


def tiny_config(family: str, vocab_size: int, **overrides):
    """``overrides``: config fields to change (a second model of a family: a draft)."""
    import transformers as tf
    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=2048, initializer_range=0.2, rms_norm_eps=1e-6,
                  bos_token_id=0, eos_token_id=0, pad_token_id=0)
    if family == "llama":
        return tf.LlamaConfig(**{**common, "rope_scaling": {
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}, "rope_theta": 10000.0,
            **overrides})
    if family == "mistral":
        return tf.MistralConfig(**{**common, "sliding_window": 24, **overrides})
    if family == "qwen2":
        return tf.Qwen2Config(**{**common, "tie_word_embeddings": True, **overrides})
    if family == "qwen3":
        return tf.Qwen3Config(**{**common, "num_key_value_heads": 1, "head_dim": 32,
                                 "tie_word_embeddings": True, **overrides})
    if family == "gemma3":
        # Both layer types (a 16-token window, shorter than most test prompts), both rope
        # bases (the global one scaled), an attention scale that is not the head size's.
        # A larger init makes every greedy step repeat the last token.
        return tf.Gemma3TextConfig(**{
            **common, "initializer_range": 0.02, "head_dim": 32, "query_pre_attn_scalar": 24,
            "sliding_window": 16, "layer_types": ["sliding_attention", "full_attention"],
            "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                "full_attention": {"rope_type": "linear", "factor": 2.0,
                                                   "rope_theta": 1000000.0}},
            "architectures": ["Gemma3ForCausalLM"], **overrides})
    raise ValueError(family)


def build_tiny_model(family: str, path, seed: int = 1234, **overrides) -> str:
    """``overrides``: config fields (``tiny_config``), e.g. a smaller draft model."""
    from transformers import AutoModelForCausalLM
    tok = build_tokenizer(path)
    torch.manual_seed(seed)
    config = tiny_config(family, overrides.pop("vocab_size", len(tok)), **overrides)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if family == "gemma3":
        # Gemma initializes its norms' offsets from one to zero: randomize them, so that a
        # norm computed as ``w`` instead of ``1 + w`` (or two norms swapped) shows.
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.normal_(0.0, 0.5)
    model.save_pretrained(str(path), safe_serialization=True)
    return str(path)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, str]:
    return {f: build_tiny_model(f, tmp_path_factory.mktemp(f)) for f in FAMILIES}


def assert_all_blocks_free(llm) -> None:
    engine = llm.engine if hasattr(llm, "engine") else llm
    assert not engine.has_unfinished_requests()
    assert engine.num_free_blocks == engine.num_total_blocks, (
        f"{engine.num_total_blocks - engine.num_free_blocks} KV blocks still held")


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` run only where CUDA exists."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


HERMES_TOOLS_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n# Tools\n<tools>\n{%- for tool in tools %}\n{{ tool | tojson }}"
    "{%- endfor %}\n</tools>\nCall a tool as <tool_call>\n{\"name\": ..., \"arguments\": ...}\n</tool_call>"
    "<|im_end|>\n{% endif %}"
    "{%- for m in messages %}"
    "{%- if m['role'] == 'assistant' and m.get('tool_calls') %}<|im_start|>assistant\n"
    "{%- for tc in m['tool_calls'] %}\n<tool_call>\n{\"name\": \"{{ tc['function']['name'] }}\", "
    "\"arguments\": {{ tc['function']['arguments'] | tojson }}}\n</tool_call>{%- endfor %}<|im_end|>\n"
    "{%- elif m['role'] == 'tool' %}<|im_start|>user\n<tool_response>\n{{ m['content'] }}\n</tool_response>"
    "<|im_end|>\n"
    "{%- else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="session")
def tools_server(tmp_path_factory):
    """One ``orbitllm serve`` of a tiny Qwen 2 whose chat template renders tools the
    Hermes way (so the hermes parser is detected), for the structured-output and
    tool-calling tests."""
    from transformers import AutoTokenizer

    from test_server import ServerProcess
    path = tmp_path_factory.mktemp("hermes")
    build_tiny_model("qwen2", path)
    tok = AutoTokenizer.from_pretrained(str(path))
    tok.chat_template = HERMES_TOOLS_TEMPLATE
    tok.save_pretrained(str(path))
    srv = ServerProcess(str(path), tmp_path_factory.mktemp("hermes-server"), "--api-key", "test-key",
                        "--max-model-len", "1536")   # tools make long prompts with a 400-token vocabulary
    srv.wait_ready()
    srv.model_path = str(path)
    yield srv
    srv.stop()
