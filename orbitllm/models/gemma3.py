"""Gemma 3 text decoders (``Gemma3ForCausalLM``: 270M, 1B, and the text towers of the larger ones).

What sets Gemma 3 apart from the Llama family, each checked against transformers:
- RMSNorm scales by ``1 + w`` in float32 (``GemmaRMSNorm``), and every layer has four of
  them: before and after attention, before and after the MLP (the "sandwich"), plus the
  per-head q/k norms;
- the embedding is multiplied by ``sqrt(hidden_size)``, rounded to the model dtype first;
- attention scores are scaled by ``query_pre_attn_scalar ** -0.5``, not by the head size;
- layers alternate between sliding-window attention (``layer_types``; 5 of every 6) with a
  local rope base and full attention with the global base and the rope scaling, so the
  model keeps one rotary table per layer type;
- the MLP is gated GELU (tanh approximation); the LM head is the embedding (tied).

Under tensor parallelism the partial sums of o_proj and down_proj go through a plain
all-reduce (their ``RowParallelLinear`` has no reduce slot): Gemma normalizes them before
the residual add, which the fused peer-memory all-reduce + add + RMSNorm does not do.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from orbitllm.layers.activation import GeluTanhAndMul
from orbitllm.layers.attention import Attention, AttentionBackend, AttentionMetadata
from orbitllm.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from orbitllm.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from orbitllm.layers.norm import GemmaRMSNorm
from orbitllm.layers.rotary import RotaryEmbedding
from orbitllm.layers.tensor_parallel import Shard, check_shardable, kv_heads_per_rank
from orbitllm.models.errors import ModelLoadError
from orbitllm.models.weights import StackedDecoderHead

SLIDING, FULL = "sliding_attention", "full_attention"


@dataclass
class Gemma3Spec:
    """What the forward pass needs to know about a Gemma 3 checkpoint."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    query_pre_attn_scalar: float
    tie_word_embeddings: bool
    layer_types: list[str]                    # SLIDING or FULL, per layer
    sliding_window: int
    rope: dict[str, tuple[float, dict]]       # layer type -> (theta, rope parameters)

    @property
    def sliding_windows(self) -> list[int | None]:
        return [self.sliding_window if t == SLIDING else None for t in self.layer_types]

    @classmethod
    def from_config(cls, config) -> "Gemma3Spec":
        """From a transformers 5 ``Gemma3TextConfig`` (or the GGUF loader's equivalent):
        rope settings live in ``rope_parameters`` keyed by layer type."""
        _check_supported(config)
        layer_types = list(config.layer_types)
        if set(layer_types) - {SLIDING, FULL}:
            raise ModelLoadError(f"layer_types: unknown attention types {sorted(set(layer_types) - {SLIDING, FULL})}")
        params = getattr(config, "rope_parameters", None) or {}
        rope = {}
        for kind in (SLIDING, FULL):
            if not isinstance(params.get(kind), dict) or "rope_theta" not in params[kind]:
                raise ModelLoadError(f"rope_parameters: no rope_theta for {kind!r} layers")
            rope[kind] = (float(params[kind]["rope_theta"]), params[kind])
        return cls(
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_layers=config.num_hidden_layers,
            num_heads=config.num_attention_heads,
            num_kv_heads=config.num_key_value_heads,
            head_dim=config.head_dim,
            rms_norm_eps=config.rms_norm_eps,
            max_position_embeddings=config.max_position_embeddings,
            query_pre_attn_scalar=float(config.query_pre_attn_scalar),
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", True)),
            layer_types=layer_types,
            sliding_window=int(config.sliding_window),
            rope=rope,
        )


def _check_supported(config) -> None:
    """Refuse, by name, the Gemma 3 options this implementation does not compute
    (no released Gemma 3 checkpoint sets them)."""
    for name in ("attn_logit_softcapping", "final_logit_softcapping"):
        if getattr(config, name, None) is not None:
            raise ModelLoadError(f"{name}={getattr(config, name)}: logit soft-capping is not supported")
    if getattr(config, "use_bidirectional_attention", False):
        raise ModelLoadError("use_bidirectional_attention: only causal attention is supported")
    if getattr(config, "attention_bias", False):
        raise ModelLoadError("attention_bias: Gemma 3 projections with biases are not supported")
    act = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", None)
    if act != "gelu_pytorch_tanh":
        raise ModelLoadError(f"hidden_activation {act!r}: only gelu_pytorch_tanh is supported")


class Gemma3Rotary(nn.Module):
    """One rotary table per layer type; ``build_cache`` fills both."""

    def __init__(self, spec: Gemma3Spec) -> None:
        super().__init__()
        self.by_type = nn.ModuleDict({
            kind: RotaryEmbedding(spec.head_dim, spec.max_position_embeddings, theta, params)
            for kind, (theta, params) in spec.rope.items()})

    def build_cache(self, device: torch.device) -> None:
        for rotary in self.by_type.values():
            rotary.build_cache(device)


class Gemma3Attention(nn.Module):
    """This rank's heads: QKV column-parallel, q/k norms, the rotary of the layer's type,
    o_proj row-parallel (summed over the ranks here: a norm, not an add, comes next)."""

    def __init__(self, spec: Gemma3Spec, layer: int, rotary: RotaryEmbedding, shard: Shard) -> None:
        super().__init__()
        self.shard = shard
        self.qkv_proj = QKVParallelLinear(spec.hidden_size, spec.head_dim, spec.num_heads,
                                          spec.num_kv_heads, shard)
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.head_dim = spec.head_dim
        self.q_size, self.kv_size = self.qkv_proj.q_size, self.qkv_proj.kv_size
        self.o_proj = RowParallelLinear(spec.num_heads * spec.head_dim, spec.hidden_size, shard)
        self.q_norm = GemmaRMSNorm(spec.head_dim, spec.rms_norm_eps)
        self.k_norm = GemmaRMSNorm(spec.head_dim, spec.rms_norm_eps)
        self.attn = Attention(spec.query_pre_attn_scalar ** -0.5, rotary, spec.sliding_windows[layer],
                              spec.num_kv_heads, shard)

    def forward(self, positions, x, kv_cache, meta: AttentionMetadata, backend: AttentionBackend):
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = self.q_norm(q.reshape(-1, self.num_heads, self.head_dim))
        k = self.k_norm(k.reshape(-1, self.num_kv_heads, self.head_dim))
        v = v.reshape(-1, self.num_kv_heads, self.head_dim)
        o = self.attn(positions, q, k, v, kv_cache, meta, backend)
        return self.shard.all_reduce(self.o_proj(o.reshape(-1, self.q_size)))


class Gemma3MLP(nn.Module):
    """This rank's columns of gate/up and rows of down_proj: ``down(gelu_tanh(gate) * up)``,
    summed over the ranks."""

    def __init__(self, spec: Gemma3Spec, shard: Shard) -> None:
        super().__init__()
        self.shard = shard
        self.gate_up_proj = MergedColumnParallelLinear(spec.hidden_size, [spec.intermediate_size] * 2, shard)
        self.act_fn = GeluTanhAndMul()
        self.down_proj = RowParallelLinear(spec.intermediate_size, spec.hidden_size, shard)

    def forward(self, x):
        return self.shard.all_reduce(self.down_proj(self.gate_up_proj(x), act=self.act_fn))


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, spec: Gemma3Spec, layer: int, rotary: RotaryEmbedding, shard: Shard) -> None:
        super().__init__()
        norm = lambda: GemmaRMSNorm(spec.hidden_size, spec.rms_norm_eps)  # noqa: E731
        self.input_layernorm = norm()
        self.self_attn = Gemma3Attention(spec, layer, rotary, shard)
        self.post_attention_layernorm = norm()
        self.pre_feedforward_layernorm = norm()
        self.mlp = Gemma3MLP(spec, shard)
        self.post_feedforward_layernorm = norm()

    def forward(self, positions, x, residual, kv_cache, meta, backend):
        """``x``: the scaled embedding (first layer, ``residual`` None) or the previous
        layer's normalized MLP output, not yet added to the residual stream. Returns
        this layer's normalized MLP output and the residual stream."""
        if residual is None:
            residual, h = x, self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm(x, residual)
        attn = self.post_attention_layernorm(self.self_attn(positions, h, kv_cache, meta, backend))
        h, residual = self.pre_feedforward_layernorm(attn, residual)
        return self.post_feedforward_layernorm(self.mlp(h)), residual


class Gemma3ForCausalLM(StackedDecoderHead, nn.Module):
    """Decoder + LM head (a ``models.interface.CausalLM``): ``forward`` returns hidden
    states, ``compute_logits`` the logits of the rows the sampler needs. Built for one
    ``shard`` of a tensor-parallel group."""


    @classmethod
    def from_config(cls, config, shard: Shard = Shard()) -> "Gemma3ForCausalLM":
        return cls(Gemma3Spec.from_config(config), shard)

    def __init__(self, spec: Gemma3Spec, shard: Shard = Shard()) -> None:
        super().__init__()
        check_shardable(spec.num_heads, spec.num_kv_heads, spec.intermediate_size, shard.size)
        self.spec = spec
        self.shard = shard
        self.num_kv_heads = kv_heads_per_rank(spec.num_kv_heads, shard.size)   # in this rank's cache
        self.embed_tokens = VocabParallelEmbedding(spec.vocab_size, spec.hidden_size, shard)
        self.rotary = Gemma3Rotary(spec)
        self.layers = nn.ModuleList(
            Gemma3DecoderLayer(spec, i, self.rotary.by_type[kind], shard)
            for i, kind in enumerate(spec.layer_types))
        self.norm = GemmaRMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.lm_head = None if spec.tie_word_embeddings else ParallelLMHead(
            spec.vocab_size, spec.hidden_size, shard)

    def build_caches(self, device: torch.device) -> None:
        """Two rotary tables: the sliding layers' and the full layers'."""
        self.rotary.build_cache(device)

    def forward(self, input_ids, positions, kv_caches, meta: AttentionMetadata,
                backend: AttentionBackend) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        # transformers rounds the scale to the model dtype before multiplying (sqrt(640) is
        # 25.25 in bfloat16); a host scalar, so a captured graph holds no tensor for it.
        x = x * torch.tensor(self.spec.hidden_size ** 0.5, dtype=x.dtype).item()
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches):
            x, residual = layer(positions, x, residual, kv_cache, meta, backend)
        return self.norm(x, residual)[0]
