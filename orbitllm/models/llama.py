"""The Llama family of decoders: Llama 2/3/3.1, Mistral, Qwen2/2.5 and Qwen3.

They differ only by switches read from the config (QKV bias for Qwen2, per-head
q/k RMSNorm for Qwen3, a sliding window for Mistral), so one implementation
serves all four. Q/K/V and gate/up projections are fused into one matmul each.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn
import torch.nn.functional as F

from orbitllm.layers.attention import AttentionBackend, AttentionMetadata
from orbitllm.layers.fused import fused_ops_for
from orbitllm.layers.linear import linear, rope_in_gemv, takes_gemv
from orbitllm.layers.norm import RMSNorm
from orbitllm.layers.rotary import RotaryEmbedding, rope_parameters
from orbitllm.layers.tensor_parallel import (Shard, VocabParallelEmbedding, check_shardable,
                                             kv_heads_per_rank)
from orbitllm.models.errors import ModelLoadError


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
    def from_config(cls, config) -> "DecoderSpec":
        model_type = config.model_type
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
            attention_bias=bool(getattr(config, "attention_bias", model_type == "qwen2")),
            qk_norm=model_type == "qwen3",
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


# The buffer slots of the fused all-reduce (PeerAllReduce): attention and MLP outputs alternate.
ATTN_SLOT, MLP_SLOT = 0, 1


class Attention(nn.Module):
    """This rank's heads: QKV column-parallel, o_proj row-parallel (returns this rank's
    partial sum)."""

    def __init__(self, spec: DecoderSpec, layer: int, rotary: RotaryEmbedding, shard: Shard) -> None:
        super().__init__()
        self.shard = shard
        self.num_heads = spec.num_heads // shard.size
        self.num_kv_heads = kv_heads_per_rank(spec.num_kv_heads, shard.size)
        self.head_dim = spec.head_dim
        self.q_size = self.num_heads * spec.head_dim
        self.kv_size = self.num_kv_heads * spec.head_dim
        self.qkv_proj = nn.Linear(spec.hidden_size, self.q_size + 2 * self.kv_size, bias=spec.attention_bias)
        self.o_proj = nn.Linear(self.q_size, spec.hidden_size, bias=False)
        self.q_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps) if spec.qk_norm else None
        self.k_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps) if spec.qk_norm else None
        self.rotary = rotary
        self.scale = spec.head_dim ** -0.5
        self.sliding_window = spec.sliding_windows[layer]

    def forward(self, positions, x, kv_cache, meta: AttentionMetadata, backend: AttentionBackend):
        if self._rope_in_gemv(x, meta, backend):
            o = self._attend_rope_in_gemv(positions, x, kv_cache, meta, backend)
        else:
            o = self._attend(positions, x, kv_cache, meta, backend)
        return self.shard.row_parallel(o.reshape(-1, self.q_size), self.o_proj.weight, ATTN_SLOT)

    def _attend(self, positions, x, kv_cache, meta: AttentionMetadata, backend: AttentionBackend):
        qkv = linear(x, self.qkv_proj.weight, self.qkv_proj.bias)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if getattr(backend, "fuses_rotary", False):   # rotated with the KV write
            return backend.forward(q, k, v, kv_cache[0], kv_cache[1], meta, self.scale,
                                   self.sliding_window, rope=(positions, self.rotary.cos_sin))
        q, k = self.rotary(positions, q, k)
        return backend.forward(q, k, v, kv_cache[0], kv_cache[1], meta, self.scale, self.sliding_window)

    def _attend_rope_in_gemv(self, positions, x, kv_cache, meta: AttentionMetadata,
                             backend: AttentionBackend):
        """The QKV GEMV rotates q/k and writes k, v to the cache; attention reads them."""
        from orbitllm.kernels.gemv import RopeWrite
        write = RopeWrite(positions, meta.slot_mapping, self.rotary.cos_sin, kv_cache[0],
                          kv_cache[1], self.q_size)
        q = linear(x, self.qkv_proj.weight, self.qkv_proj.bias, rope=write)[:, :self.q_size]
        return backend.forward(q.view(-1, self.num_heads, self.head_dim), None, None, kv_cache[0],
                               kv_cache[1], meta, self.scale, self.sliding_window, store_kv=False)

    def _rope_in_gemv(self, x, meta: AttentionMetadata, backend: AttentionBackend) -> bool:
        """One-row decode steps may rotate q/k and write the KV cache in the QKV GEMV's
        epilogue (``ORBITLLM_ROPE_GEMV=1``): full rotary, no q/k norm, a Triton backend."""
        return (meta.max_query_len == 1 and self.q_norm is None and rope_in_gemv()
                and getattr(backend, "fuses_rotary", False)
                and self.rotary.cos_sin.shape[1] == self.head_dim
                and takes_gemv(x, self.qkv_proj.weight))


class MLP(nn.Module):
    """This rank's columns of gate/up and rows of down_proj (returns this rank's partial sum)."""

    def __init__(self, spec: DecoderSpec, shard: Shard) -> None:
        super().__init__()
        self.shard = shard
        size = spec.intermediate_size // shard.size
        self.gate_up_proj = nn.Linear(spec.hidden_size, 2 * size, bias=False)
        self.down_proj = nn.Linear(size, spec.hidden_size, bias=False)

    def forward(self, x):
        gate_up = linear(x, self.gate_up_proj.weight)
        if takes_gemv(gate_up, self.down_proj.weight):   # the GEMV applies the activation
            return self.shard.row_parallel(gate_up, self.down_proj.weight, MLP_SLOT, silu_mul=True)
        ops = fused_ops_for(gate_up)
        if ops is not None:
            act = ops.silu_and_mul(gate_up)
        else:
            gate, up = gate_up.chunk(2, dim=-1)
            act = F.silu(gate) * up
        return self.shard.row_parallel(act, self.down_proj.weight, MLP_SLOT)


class DecoderLayer(nn.Module):
    def __init__(self, spec: DecoderSpec, layer: int, rotary: RotaryEmbedding, shard: Shard) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.self_attn = Attention(spec, layer, rotary, shard)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.mlp = MLP(spec, shard)
        self.shard = shard

    def forward(self, positions, x, residual, kv_cache, meta, backend):
        """``x``: the embedding (first layer, ``residual`` None) or the previous layer's
        MLP partial sum. Returns this layer's MLP partial sum and the residual stream."""
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.shard.reduce_norm(x, residual, self.input_layernorm, MLP_SLOT)
        x = self.self_attn(positions, x, kv_cache, meta, backend)
        x, residual = self.shard.reduce_norm(x, residual, self.post_attention_layernorm, ATTN_SLOT)
        return self.mlp(x), residual


class LlamaForCausalLM(nn.Module):
    """Decoder + LM head. ``forward`` returns hidden states; ``compute_logits`` the logits
    of the rows the sampler needs, so the vocab projection runs only where used.
    Built for one ``shard`` of a tensor-parallel group (default: the whole model)."""

    # HF name fragment -> (our fused parameter, shard index)
    _stacked = {
        "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, spec: DecoderSpec, shard: Shard = Shard()) -> None:
        super().__init__()
        check_shardable(spec.num_heads, spec.num_kv_heads, spec.intermediate_size, shard.size)
        self.spec = spec
        self.shard = shard
        self.num_kv_heads = kv_heads_per_rank(spec.num_kv_heads, shard.size)   # in this rank's cache
        rotary = RotaryEmbedding(spec.head_dim, spec.max_position_embeddings,
                                 spec.rope_theta, spec.rope_scaling)
        # Its weight is allocated uninitialized: a random init on the meta device
        # imports torch._dynamo (~2 s of start-up).
        self.embed_tokens = VocabParallelEmbedding(spec.vocab_size, spec.hidden_size, shard)
        self.rotary = rotary
        self.layers = nn.ModuleList(DecoderLayer(spec, i, rotary, shard) for i in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.lm_head = None if spec.tie_word_embeddings else nn.Linear(
            spec.hidden_size, self.embed_tokens.rows, bias=False)

    def forward(self, input_ids, positions, kv_caches, meta: AttentionMetadata,
                backend: AttentionBackend) -> torch.Tensor:
        x, residual = self.embed_tokens(input_ids), None
        for layer, kv_cache in zip(self.layers, kv_caches):
            x, residual = layer(positions, x, residual, kv_cache, meta, backend)
        x, _ = self.shard.reduce_norm(x, residual, self.norm, MLP_SLOT)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """Logits of ``hidden``'s rows. Under tensor parallelism every rank must call
        this for the same rows; the full logits land on the driver (None elsewhere)."""
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        logits = linear(hidden, weight)   # one row: the GEMV (5-9 % faster than cuBLAS on an H200)
        if self.shard.size == 1:
            return logits
        full = self.shard.gather_last_dim(logits)
        return None if full is None else full[:, :self.spec.vocab_size]

    def shard_sizes(self, fused: str) -> list[int]:
        s = self.spec
        if fused == "qkv_proj":
            q, kv = s.num_heads // self.shard.size * s.head_dim, self.num_kv_heads * s.head_dim
            return [q, kv, kv]
        return [s.intermediate_size // self.shard.size] * 2

    def weight_slice(self, hf_name: str, shape: tuple[int, ...]) -> tuple[int, int, int] | None:
        """(dim, start, length) of the checkpoint tensor ``hf_name`` that this rank
        holds; None when every rank holds all of it (norms)."""
        s, shard = self.spec, self.shard
        q_start, q_len = shard.split(s.num_heads * s.head_dim)
        if ".q_proj." in hf_name:
            return 0, q_start, q_len
        if ".k_proj." in hf_name or ".v_proj." in hf_name:
            first_head = shard.rank * s.num_kv_heads // shard.size
            return 0, first_head * s.head_dim, self.num_kv_heads * s.head_dim
        if ".o_proj." in hf_name:
            return 1, q_start, q_len
        if ".gate_proj." in hf_name or ".up_proj." in hf_name:
            return 0, *shard.split(s.intermediate_size)
        if ".down_proj." in hf_name:
            return 1, *shard.split(s.intermediate_size)
        if hf_name.endswith(("embed_tokens.weight", "lm_head.weight")):
            start = self.embed_tokens.start
            return 0, start, max(0, min(self.embed_tokens.rows, shape[0] - start))
        return None

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], source: str) -> None:
        """Copy HF-named tensors in one at a time; every parameter must be filled."""
        params = dict(self.named_parameters())
        expected = {n for n in params}
        loaded: set[str] = set()
        for hf_name, tensor in weights:
            name, shard = self._map_name(hf_name)
            if name is None:
                continue
            if name not in params:
                raise ModelLoadError(f"{source}: unexpected tensor {hf_name!r} for this architecture")
            param = params[name]
            if self.shard.size > 1 and name in ("embed_tokens.weight", "lm_head.weight"):
                target = param.data[:tensor.shape[0]]   # this rank's vocab rows
                param.data[tensor.shape[0]:].zero_()     # padding of the last rank's part
            elif shard is None:
                target = param.data
            else:
                fused = name.split(".")[-2]
                sizes = self.shard_sizes(fused)
                start = sum(sizes[:shard])
                target = param.data.narrow(0, start, sizes[shard])
            if tuple(target.shape) != tuple(tensor.shape):
                raise ModelLoadError(f"{source}: tensor {hf_name!r} has shape {tuple(tensor.shape)}, "
                                     f"expected {tuple(target.shape)}")
            target.copy_(tensor)
            loaded.add(f"{name}#{shard}")
        missing = [n for n in expected if not any(k.startswith(n + "#") for k in loaded)]
        if missing:
            raise ModelLoadError(f"{source}: checkpoint lacks weights for {sorted(missing)[:5]}"
                                 f"{' ...' if len(missing) > 5 else ''}")
        incomplete = [n for n in expected if n.endswith(("qkv_proj.weight", "gate_up_proj.weight"))
                      and sum(k.startswith(n + "#") for k in loaded)
                      != len(self.shard_sizes(n.split(".")[-2]))]
        if incomplete:
            raise ModelLoadError(f"{source}: checkpoint lacks part of {sorted(incomplete)[:3]}")

    def _map_name(self, hf_name: str) -> tuple[str | None, int | None]:
        if "rotary_emb" in hf_name:
            return None, None
        name = hf_name.removeprefix("model.")
        if name == "lm_head.weight" and self.lm_head is None:
            return None, None   # tied: the embedding is the head
        for frag, (fused, shard) in self._stacked.items():
            if f".{frag}." in name:
                return name.replace(frag, fused), shard
        return name, None


