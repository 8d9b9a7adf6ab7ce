"""Attention backend on the Triton paged-attention kernels (the fast GPU path)."""
from __future__ import annotations

import torch

from orbitllm.kernels.kv_write import KVScales, rotary_store_kv_cache, store_kv_cache
from orbitllm.kernels.paged_attention import paged_decode_attention, paged_prefill_attention
from orbitllm.layers.attention import AttentionMetadata


class TritonAttentionBackend:
    """Same contract as ``TorchAttentionBackend``, without host syncs.

    Decode-only steps (``max_query_len == 1``) use the split-KV decode kernel, whose
    grid depends only on shapes and ``meta.num_kv_splits`` / ``meta.max_seq_len``, so
    the step can be captured in a CUDA graph; padded sequences (``seq_len`` 0, slot -1)
    are skipped on the device. Other steps (prefill, prefix hits, chunked prefill,
    mixed batches) use the varlen prefill kernel.
    """

    supports_cuda_graphs = True
    fuses_rotary = True   # forward takes ``rope`` and rotates q/k itself, with the KV write

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                scale: float, sliding_window: int | None,
                kv_scales: KVScales = None,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """``rope``: (positions, cos/sin cache) when q and k still need the rotary
        embedding; ``k`` is then left unrotated (only the cache holds rotated keys)."""
        if rope is not None:
            rotary_store_kv_cache(q, k, v, k_cache, v_cache, meta.slot_mapping, *rope, kv_scales=kv_scales)
        else:
            store_kv_cache(k, v, k_cache, v_cache, meta.slot_mapping, kv_scales)
        if meta.max_query_len == 1:
            return paged_decode_attention(
                q, k_cache, v_cache, meta.query_start_loc, meta.seq_lens, meta.block_tables,
                meta.max_seq_len, scale, sliding_window, num_splits=meta.num_kv_splits,
                kv_scales=kv_scales)
        return paged_prefill_attention(
            q, k_cache, v_cache, meta.query_start_loc, meta.seq_lens, meta.block_tables,
            meta.max_query_len, scale, sliding_window, kv_scales=kv_scales)
