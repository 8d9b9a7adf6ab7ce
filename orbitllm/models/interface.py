"""What the engine needs from a model class: the runner, the CUDA graphs and the setup
use nothing else. A model is an ``nn.Module`` (moved with ``.to``/``.to_empty``, its
parameters filled by ``load_weights`` or a random init) that also has these members."""
from __future__ import annotations

from typing import Iterable, Protocol

import torch

from orbitllm.layers.attention import AttentionBackend, AttentionMetadata
from orbitllm.layers.tensor_parallel import Shard
from orbitllm.layers.weight_loading import CheckpointTensor


class ModelSpec(Protocol):
    """The architecture facts the engine reads (a model's own spec has more)."""

    vocab_size: int
    num_layers: int               # KV cache layers
    head_dim: int
    max_position_embeddings: int


class CausalLM(Protocol):
    spec: ModelSpec
    shard: Shard                  # this rank's place in the tensor-parallel group
    num_kv_heads: int             # KV heads in this rank's cache

    @classmethod
    def from_config(cls, config, shard: Shard = Shard()) -> "CausalLM":
        """The model for a Hugging Face config (its spec built from it), this rank's
        shard of it, parameters not yet filled (built on the meta device)."""

    def build_caches(self, device: torch.device) -> None:
        """Compute the tables that are not weights (rotary cos/sin) on ``device``, after
        the parameters are there."""

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: torch.Tensor,
                meta: AttentionMetadata, backend: AttentionBackend) -> torch.Tensor:
        """Hidden states of the step's tokens; ``kv_caches`` is
        ``[num_layers, 2, blocks, block_size, num_kv_heads, head_dim]``."""

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """Logits of ``hidden``'s rows; under tensor parallelism every rank calls it for
        the same rows and the driver gets them (None elsewhere)."""

    def load_weights(self, weights: Iterable[tuple[str, CheckpointTensor]], source: str) -> None:
        """Fill every parameter from Hugging Face-named checkpoint tensors (this rank's
        slices); ModelLoadError naming ``source`` when one is missing or misshapen."""
