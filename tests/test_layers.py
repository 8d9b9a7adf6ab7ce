"""The linear layers' weight loaders: every rank of a simulated tensor-parallel group
loads its slice of the full checkpoint tensors (in memory, and lazily from disk, where
only the slice may be read), and the ranks' products put together equal the full
product. The model registry: each architecture's class, built from its own config."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from orbitllm.layers.activation import SiluAndMul
from orbitllm.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from orbitllm.layers.linear import (ColumnParallelLinear, MergedColumnParallelLinear,
                                    QKVParallelLinear, RowParallelLinear)
from orbitllm.layers.tensor_parallel import Shard
from orbitllm.layers.weight_loading import LazyTensor
from orbitllm.models import registry
from orbitllm.models.errors import ModelLoadError

HIDDEN = 12


def ranks(size: int) -> list[Shard]:
    return [Shard(rank, size) for rank in range(size)]


class Reads:
    """Checkpoint tensors as ``LazyTensor``s that record the shape of every read."""

    def __init__(self) -> None:
        self.shapes: list[tuple[int, ...]] = []

    def lazy(self, t: torch.Tensor) -> LazyTensor:
        def read_slice(index):
            self.shapes.append(tuple(t[index].shape))
            return t[index].clone()

        def read():
            self.shapes.append(tuple(t.shape))
            return t.clone()
        return LazyTensor(tuple(t.shape), read, read_slice)


@pytest.fixture(params=["tensor", "lazy"])
def source(request):
    """How the checkpoint hands its tensors over: in memory, or read from disk on demand."""
    reads = Reads()
    wrap = (lambda t: t) if request.param == "tensor" else reads.lazy
    return wrap, reads, request.param == "lazy"


@pytest.mark.parametrize("size", [1, 2, 3])
def test_column_parallel_outputs_concatenate_to_the_full_product(source, size):
    wrap, reads, lazy = source
    w, b, x = torch.randn(12, HIDDEN), torch.randn(12), torch.randn(5, HIDDEN)
    outs = []
    for shard in ranks(size):
        layer = ColumnParallelLinear(HIDDEN, 12, shard, bias=True)
        layer.load_weight("weight", wrap(w))
        layer.load_weight("bias", wrap(b))
        outs.append(layer(x))
    torch.testing.assert_close(torch.cat(outs, -1), F.linear(x, w, b))
    if lazy:   # each rank read its rows of the weight and of the bias, no more
        assert reads.shapes == [(12 // size, HIDDEN), (12 // size,)] * size


@pytest.mark.parametrize("size", [1, 2, 4])
def test_row_parallel_partials_sum_to_the_full_product(source, size):
    wrap, reads, lazy = source
    w, x = torch.randn(HIDDEN, 16), torch.randn(3, 16)
    total = torch.zeros(3, HIDDEN)
    for shard in ranks(size):
        layer = RowParallelLinear(16, HIDDEN, shard)
        layer.load_weight("weight", wrap(w))
        start, length = shard.split(16)
        total += layer(x[:, start:start + length])
    torch.testing.assert_close(total, F.linear(x, w))
    if lazy:
        assert reads.shapes == [(HIDDEN, 16 // size)] * size


@pytest.mark.parametrize("size", [1, 2])
def test_merged_gate_up_with_the_activation_equals_the_mlp(source, size):
    """gate and up loaded as shards 0 and 1; SiLU·mul applied by the row-parallel layer."""
    wrap, _, _ = source
    inter = 8
    gate, up, down = torch.randn(inter, HIDDEN), torch.randn(inter, HIDDEN), torch.randn(HIDDEN, inter)
    x = torch.randn(4, HIDDEN)
    total = torch.zeros(4, HIDDEN)
    for shard in ranks(size):
        gate_up = MergedColumnParallelLinear(HIDDEN, [inter, inter], shard)
        gate_up.load_weight("weight", wrap(gate), 0)
        gate_up.load_weight("weight", wrap(up), 1)
        down_proj = RowParallelLinear(inter, HIDDEN, shard)
        down_proj.load_weight("weight", wrap(down))
        total += down_proj(gate_up(x), act=SiluAndMul())
    torch.testing.assert_close(total, F.linear(F.silu(x @ gate.T) * (x @ up.T), down))


@pytest.mark.parametrize("heads,kv_heads,size", [(4, 2, 1), (4, 2, 2), (4, 1, 4), (6, 2, 2)])
def test_qkv_ranks_hold_their_query_heads_and_the_kv_heads_those_read(source, heads, kv_heads, size):
    """With fewer KV heads than ranks each rank holds the KV head its query heads read."""
    wrap, reads, lazy = source
    head_dim = 4
    wq, wk, wv = (torch.randn(n * head_dim, HIDDEN) for n in (heads, kv_heads, kv_heads))
    bq, bk, bv = (torch.randn(n * head_dim) for n in (heads, kv_heads, kv_heads))
    x = torch.randn(3, HIDDEN)
    q_full, k_full, v_full = F.linear(x, wq, bq), F.linear(x, wk, bk), F.linear(x, wv, bv)
    qs = []
    for shard in ranks(size):
        layer = QKVParallelLinear(HIDDEN, head_dim, heads, kv_heads, shard, bias=True)
        for shard_id, w, b in (("q", wq, bq), ("k", wk, bk), ("v", wv, bv)):
            layer.load_weight("weight", wrap(w), shard_id)
            layer.load_weight("bias", wrap(b), shard_id)
        q, k, v = layer(x).split([layer.q_size, layer.kv_size, layer.kv_size], -1)
        qs.append(q)
        per_rank = max(1, kv_heads // size)
        first = shard.rank * kv_heads // size
        cols = slice(first * head_dim, (first + per_rank) * head_dim)
        torch.testing.assert_close(k, k_full[:, cols])
        torch.testing.assert_close(v, v_full[:, cols])
    torch.testing.assert_close(torch.cat(qs, -1), q_full)
    if lazy and size > 1:
        assert max(s[0] for s in reads.shapes) <= heads * head_dim // size


@pytest.mark.parametrize("size", [1, 2, 3])
def test_vocab_rows_are_split_and_the_last_part_padded(source, size):
    wrap, _, _ = source
    vocab = 10
    table = torch.randn(vocab, HIDDEN)
    rows = []
    for shard in ranks(size):
        head = ParallelLMHead(vocab, HIDDEN, shard)
        head.load_weight("weight", wrap(table))
        length = max(0, min(head.rows, vocab - head.start))
        assert torch.equal(head.weight[length:], torch.zeros(head.rows - length, HIDDEN))
        rows.append(head.weight[:length])
    assert torch.equal(torch.cat(rows), table)
    embed = VocabParallelEmbedding(vocab, HIDDEN)
    embed.load_weight("weight", wrap(table))
    hidden = torch.randn(2, HIDDEN)
    torch.testing.assert_close(embed.compute_logits(hidden), hidden @ table.T)
    assert torch.equal(embed(torch.tensor([3, 9])), table[[3, 9]])


def test_a_misshapen_checkpoint_tensor_is_refused_not_truncated():
    """A rank's slice would fit, but the checkpoint's tensor is not the layer's shape."""
    layer = ColumnParallelLinear(HIDDEN, 8, Shard(0, 2))
    with pytest.raises(ValueError, match=r"has shape \(12, 12\), expected \(8, 12\)"):
        layer.load_weight("weight", torch.randn(12, HIDDEN))


def _tiny_config(family: str):
    import transformers as tf
    common = dict(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    return {"llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config,
            "qwen3": tf.Qwen3Config}[family](**common)


@pytest.mark.parametrize("family,arch,bias,qk_norm", [
    ("llama", "LlamaForCausalLM", False, False), ("mistral", "MistralForCausalLM", False, False),
    ("qwen2", "Qwen2ForCausalLM", True, False), ("qwen3", "Qwen3ForCausalLM", False, True)])
def test_each_architecture_builds_its_own_spec(family, arch, bias, qk_norm):
    config = _tiny_config(family)
    config.architectures = [arch]   # as a checkpoint's config.json says
    assert registry.architecture_of(config, "cfg") == arch
    with torch.device("meta"):
        model = registry.model_class(arch).from_config(config)
    assert type(model).__name__ == arch
    assert (model.spec.attention_bias, model.spec.qk_norm) == (bias, qk_norm)
    assert (model.layers[0].self_attn.qkv_proj.bias is not None) == bias
    assert (model.layers[0].self_attn.q_norm is not None) == qk_norm


def test_unknown_architecture_names_the_supported_ones():
    config = _tiny_config("llama")
    config.architectures = ["GPT2LMHeadModel"]
    with pytest.raises(ModelLoadError, match="unsupported architecture.*Qwen3ForCausalLM"):
        registry.architecture_of(config, "cfg")


def test_every_gguf_architecture_is_registered():
    from orbitllm.models.gguf import ARCHITECTURES
    assert all(registry.is_supported(a.model_class) for a in ARCHITECTURES.values())


def test_model_modules_are_imported_only_when_built():
    code = ("import sys, orbitllm.models.loader, orbitllm.executor.setup; "
            "print('orbitllm.models.llama' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_a_fused_parameter_missing_a_shard_is_reported(tiny_models):
    from safetensors.torch import load_file
    path = tiny_models["llama"]
    state = load_file(f"{path}/model.safetensors")
    from transformers import AutoConfig
    config = AutoConfig.from_pretrained(path)
    model = registry.model_class("LlamaForCausalLM").from_config(config)
    weights = [(n, t) for n, t in state.items() if n != "model.layers.1.self_attn.v_proj.weight"]
    with pytest.raises(ModelLoadError, match=r"lacks part of \['layers.1.self_attn.qkv_proj.weight'\]"):
        model.load_weights(weights, "tiny")
    model.load_weights(state.items(), "tiny")   # all of it loads
