"""The Llama family of decoders: Llama 2/3/3.1, Mistral, Qwen2/2.5 and Qwen3.

They differ only in what their configs switch on: QKV bias (Qwen2's configs do not
say, its checkpoints always have it), per-head q/k RMSNorm (Qwen3), a sliding window
(Mistral, read from every config). One class per architecture states its facts; the
layers are shared. Q/K/V and gate/up are fused into one projection each.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from orbitllm.layers.activation import SiluAndMul
from orbitllm.layers.attention import Attention, AttentionBackend, AttentionMetadata
from orbitllm.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from orbitllm.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from orbitllm.layers.norm import RMSNorm
from orbitllm.layers.rotary import RotaryEmbedding, rope_parameters
from orbitllm.layers.tensor_parallel import ReduceSlot, Shard, check_shardable, kv_heads_per_rank
from orbitllm.models.weights import StackedDecoderHead


@dataclass
class DecoderSpec:
    """What the forward pass needs to know about a checkpoint's architecture."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope_theta: float
    rope_scaling: dict
    attention_bias: bool
    qk_norm: bool
    tie_word_embeddings: bool
    sliding_windows: list[int | None]   # per layer

    @classmethod
    def from_config(cls, config, attention_bias: bool = False, qk_norm: bool = False) -> "DecoderSpec":
        """``attention_bias``: the default where the config has no such field."""
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        theta, scaling = rope_parameters(config)
        return cls(
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_layers=config.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            rms_norm_eps=config.rms_norm_eps,
            max_position_embeddings=config.max_position_embeddings,
            rope_theta=theta,
            rope_scaling=scaling,
            attention_bias=bool(getattr(config, "attention_bias", attention_bias)),
            qk_norm=qk_norm,
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            sliding_windows=_sliding_windows(config),
        )


def _sliding_windows(config) -> list[int | None]:
    window = getattr(config, "sliding_window", None)
    if not window or not getattr(config, "use_sliding_window", True):
        return [None] * config.num_hidden_layers
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return [window if t == "sliding_attention" else None for t in layer_types]
    return [window] * config.num_hidden_layers


class LlamaAttention(nn.Module):
    """This rank's heads: QKV column-parallel, o_proj row-parallel (returns this rank's
    partial sum)."""

    def __init__(self, spec: DecoderSpec, layer: int, rotary: RotaryEmbedding, shard: Shard) -> None:
        super().__init__()
        self.qkv_proj = QKVParallelLinear(spec.hidden_size, spec.head_dim, spec.num_heads,
                                          spec.num_kv_heads, shard, bias=spec.attention_bias)
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.head_dim = spec.head_dim
        self.q_size, self.kv_size = self.qkv_proj.q_size, self.qkv_proj.kv_size
        self.o_proj = RowParallelLinear(spec.num_heads * spec.head_dim, spec.hidden_size, shard,
                                        reduce_slot=ReduceSlot.ATTENTION)
        self.q_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps) if spec.qk_norm else None
        self.k_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps) if spec.qk_norm else None
        self.attn = Attention(spec.head_dim ** -0.5, rotary, spec.sliding_windows[layer],
                              spec.num_kv_heads, shard)

    def forward(self, positions, x, kv_cache, meta: AttentionMetadata, backend: AttentionBackend):
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        o = self.attn(positions, q, k, v, kv_cache, meta, backend)
        return self.o_proj(o.reshape(-1, self.q_size))


class LlamaMLP(nn.Module):
    """This rank's columns of gate/up and rows of down_proj (returns this rank's partial sum)."""

    def __init__(self, spec: DecoderSpec, shard: Shard) -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(spec.hidden_size, [spec.intermediate_size] * 2, shard)
        self.act_fn = SiluAndMul()
        self.down_proj = RowParallelLinear(spec.intermediate_size, spec.hidden_size, shard,
                                           reduce_slot=ReduceSlot.MLP)

    def forward(self, x):
        return self.down_proj(self.gate_up_proj(x), act=self.act_fn)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, spec: DecoderSpec, layer: int, rotary: RotaryEmbedding, shard: Shard) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, shard)
        self.self_attn = LlamaAttention(spec, layer, rotary, shard)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, shard)
        self.mlp = LlamaMLP(spec, shard)

    def forward(self, positions, x, residual, kv_cache, meta, backend):
        """``x``: the embedding (first layer, ``residual`` None) or the previous layer's
        MLP partial sum. Returns this layer's MLP partial sum and the residual stream."""
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(positions, x, kv_cache, meta, backend)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class LlamaForCausalLM(StackedDecoderHead, nn.Module):
    """Decoder + LM head. ``forward`` returns hidden states; ``compute_logits`` the logits
    of the rows the sampler needs, so the vocab projection runs only where used.
    Built for one ``shard`` of a tensor-parallel group (default: the whole model)."""

    # What an architecture's checkpoints have that its config may not say.
    attention_bias = False   # the default where the config has no attention_bias field
    qk_norm = False          # per-head RMSNorm of q and k


    @classmethod
    def from_config(cls, config, shard: Shard = Shard()) -> "LlamaForCausalLM":
        return cls(DecoderSpec.from_config(config, cls.attention_bias, cls.qk_norm), shard)

    def __init__(self, spec: DecoderSpec, shard: Shard = Shard()) -> None:
        super().__init__()
        check_shardable(spec.num_heads, spec.num_kv_heads, spec.intermediate_size, shard.size)
        self.spec = spec
        self.shard = shard
        self.num_kv_heads = kv_heads_per_rank(spec.num_kv_heads, shard.size)   # in this rank's cache
        self.rotary = RotaryEmbedding(spec.head_dim, spec.max_position_embeddings,
                                      spec.rope_theta, spec.rope_scaling)
        self.embed_tokens = VocabParallelEmbedding(spec.vocab_size, spec.hidden_size, shard)
        self.layers = nn.ModuleList(LlamaDecoderLayer(spec, i, self.rotary, shard)
                                    for i in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, shard)
        self.lm_head = None if spec.tie_word_embeddings else ParallelLMHead(
            spec.vocab_size, spec.hidden_size, shard)

    def build_caches(self, device: torch.device) -> None:
        """One rotary table serves every layer."""
        self.rotary.build_cache(device)

    def forward(self, input_ids, positions, kv_caches, meta: AttentionMetadata,
                backend: AttentionBackend) -> torch.Tensor:
        x, residual = self.embed_tokens(input_ids), None
        for layer, kv_cache in zip(self.layers, kv_caches):
            x, residual = layer(positions, x, residual, kv_cache, meta, backend)
        x, _ = self.norm(x, residual)
        return x


class MistralForCausalLM(LlamaForCausalLM):
    """Llama with a sliding window (which every variant reads from its config)."""


class Qwen2ForCausalLM(LlamaForCausalLM):
    """Llama with Q/K/V biases: Qwen2's configs have no attention_bias field."""

    attention_bias = True


class Qwen3ForCausalLM(LlamaForCausalLM):
    """Llama with an RMSNorm over each query and key head before the rotary embedding."""

    qk_norm = True
