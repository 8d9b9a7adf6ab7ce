"""Rotary position embedding (rotate-half / NeoX layout, as Llama and Qwen use),
with the rope scaling variants used by Llama 2/3/3.1 (default, linear, llama3)."""
from __future__ import annotations

import math

import torch
from torch import nn

from orbitllm.layers.fused import fused_ops_for


def rope_parameters(config) -> tuple[float, dict]:
    """(theta, scaling dict) from a transformers config, old or new style."""
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and "rope_theta" in params:
        return float(params["rope_theta"]), params
    scaling = getattr(config, "rope_scaling", None) or {}
    return float(getattr(config, "rope_theta", 10000.0)), scaling


def inv_frequencies(head_dim: int, theta: float, scaling: dict) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and the position multiplier for the scaling type."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    kind = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    if kind == "default":
        return inv_freq, 1.0
    if kind == "linear":
        return inv_freq / float(scaling["factor"]), 1.0
    if kind == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_len = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        mid = (1 - smooth) * scaled / factor + smooth * scaled
        is_mid = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(is_mid, mid, scaled), 1.0
    raise ValueError(f"rope_scaling: unsupported rope type {kind!r} (default, linear, llama3)")


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: dict) -> None:
        super().__init__()
        self.head_dim, self.max_positions = head_dim, max_positions
        self.theta, self.scaling = theta, scaling
        self.cos_sin: torch.Tensor | None = None

    def build_cache(self, device: torch.device) -> None:
        """[max_positions, head_dim]: cos of each frequency, then sin (float32 like transformers)."""
        inv_freq, _ = inv_frequencies(self.head_dim, self.theta, self.scaling)
        t = torch.arange(self.max_positions, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)
        self.cos_sin = torch.cat([freqs.cos(), freqs.sin()], -1).to(device)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        """q: [T, Hq, D], k: [T, Hk, D]; returns the rotated tensors (in place on GPU)."""
        ops = fused_ops_for(q)
        if ops is not None:
            ops.apply_rotary_emb(q, k, positions, self.cos_sin)
            return q, k
        cos, sin = self.cos_sin[positions].chunk(2, dim=-1)
        cos = torch.cat([cos, cos], -1)[:, None, :]
        sin = torch.cat([sin, sin], -1)[:, None, :]
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)
