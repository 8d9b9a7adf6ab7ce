"""Triton kernels of the fast GPU path (importing this package needs triton)."""
from orbitllm.kernels.fused_ops import (
    apply_rotary_emb,
    apply_rotary_emb_ref,
    rms_norm,
    rms_norm_ref,
    silu_and_mul,
    silu_and_mul_ref,
)
from orbitllm.kernels.kv_write import rotary_store_kv_cache, store_kv_cache
from orbitllm.kernels.paged_attention import (
    DecodeConfig,
    PrefillConfig,
    choose_num_splits,
    paged_decode_attention,
    paged_prefill_attention,
)

__all__ = [
    "DecodeConfig", "PrefillConfig", "apply_rotary_emb", "apply_rotary_emb_ref", "choose_num_splits",
    "paged_decode_attention", "paged_prefill_attention", "rms_norm", "rms_norm_ref",
    "rotary_store_kv_cache",
    "silu_and_mul", "silu_and_mul_ref", "store_kv_cache",
]
