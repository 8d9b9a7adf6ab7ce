"""Writing a step's new keys and values into the paged KV cache, ``[num_blocks,
block_size, num_kv_heads, head_dim]`` per layer (the layout ``paged_attention.py``
reads).

* ``store_kv_cache``: scatter the step's new K and V into their slots.
* ``rotary_store_kv_cache``: the same, applying the rotary embedding to q and k on
  the way (one kernel per layer where there were two).

An FP8 cache (``kv_cache_dtype="fp8"``) gets E4M3 values, saturated at +-448; the
attention kernels widen them to the query's dtype as they load tiles. ``kv_scales``
(a checkpoint's ``k_scale`` / ``v_scale``, float32 ``[num_kv_heads]``: a per-tensor
scale repeated for every head) divides each head's K and V before the cast, and the
attention kernels multiply it back (``paged_attention.py``). Without them the scale is
1.0: K/V of normal models lie well inside +-448, and a scale computed from the data
would need a pass over it before every write.

Slots < 0 (CUDA-graph padding) are skipped on the device, so no launch needs a host sync.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from orbitllm.kernels.fused_ops import _cos_sin, _rotate_heads, _warps_for, rotate_half
from orbitllm.kernels.pdl import pdl_args, pdl_enter


# (k_scale, v_scale), each float32 [num_kv_heads]; None: scale 1.0.
KVScales = tuple[torch.Tensor, torch.Tensor] | None


@triton.jit
def _to_cache(x, cache_ptr, scale, SCALED: tl.constexpr):
    """``x`` in the cache's dtype, divided by its head's ``scale`` (float32, broadcast
    over ``x``) when ``SCALED``; an FP8 (E4M3) cache saturates at +-448 as torch's cast does."""
    if SCALED:
        x = x.to(tl.float32) / scale
    if cache_ptr.dtype.element_ty == tl.float8e4nv:
        x = tl.clamp(x.to(tl.float32), -448.0, 448.0)
    return x.to(cache_ptr.dtype.element_ty)


@triton.jit
def _head_scales(k_scale_ptr, v_scale_ptr, h, num_kv_heads, SCALED: tl.constexpr):
    """The K and V scales of heads ``h`` (``[BLOCK_H, 1]``); 1.0 without ``SCALED``."""
    k_scale = 1.0
    v_scale = 1.0
    if SCALED:
        k_scale = tl.load(k_scale_ptr + h, mask=h < num_kv_heads, other=1.0)
        v_scale = tl.load(v_scale_ptr + h, mask=h < num_kv_heads, other=1.0)
    return k_scale, v_scale


@triton.jit
def _store_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, k_scale_ptr, v_scale_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cb, stride_cs, stride_ch,
    num_kv_heads,
    PAGE: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, SCALED: tl.constexpr,
):
    """One program per token: copy all its KV heads to cache slot ``slot`` (skip if < 0)."""
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:
        h = tl.arange(0, BLOCK_H)[:, None]
        d = tl.arange(0, BLOCK_D)[None, :]
        mask = (h < num_kv_heads) & (d < HEAD_DIM)
        dst = (slot // PAGE) * stride_cb + (slot % PAGE) * stride_cs + h * stride_ch + d
        k_scale, v_scale = _head_scales(k_scale_ptr, v_scale_ptr, h, num_kv_heads, SCALED)
        k = tl.load(k_ptr + t * stride_kt + h * stride_kh + d, mask=mask)
        v = tl.load(v_ptr + t * stride_vt + h * stride_vh + d, mask=mask)
        tl.store(k_cache_ptr + dst, _to_cache(k, k_cache_ptr, k_scale, SCALED), mask=mask)
        tl.store(v_cache_ptr + dst, _to_cache(v, v_cache_ptr, v_scale, SCALED), mask=mask)


def store_kv_cache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                   v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                   kv_scales: KVScales = None) -> None:
    """Write ``k``/``v`` ``[num_tokens, num_kv_heads, head_dim]`` into their cache slots,
    divided by ``kv_scales`` (per KV head) where given.

    Slots < 0 (padding) are skipped on the device, so the launch needs no host sync.
    """
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    check_cache(k_cache, v_cache)
    check_kv_scales(kv_scales, num_kv_heads)
    assert k.stride(-1) == 1 and v.stride(-1) == 1, "k/v need a contiguous last dim"
    _store_kv_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping, *(kv_scales or (None, None)),
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        num_kv_heads,
        PAGE=k_cache.shape[1], HEAD_DIM=head_dim,
        BLOCK_H=triton.next_power_of_2(num_kv_heads), BLOCK_D=triton.next_power_of_2(head_dim),
        SCALED=kv_scales is not None,
    )


@triton.jit
def _rotary_store_kv_kernel(
    q_ptr, k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, pos_ptr, cos_sin_ptr,
    k_scale_ptr, v_scale_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cb, stride_cs, stride_ch, stride_c,
    num_q_heads, num_kv_heads,
    PAGE: tl.constexpr, HEAD_DIM: tl.constexpr, HALF: tl.constexpr,
    BLOCK_QH: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_D: tl.constexpr,
    SCALED: tl.constexpr, PDL: tl.constexpr,
):
    """One program per token: rotate its q heads in place, then write its rotated k
    and its v to cache slot ``slot`` (skip if < 0). k itself is left as it was: the
    attention kernels read keys from the cache only.

    Position, slot and cos/sin are loaded before the wait for the kernel before (PDL):
    the step's inputs are copied in before its chain of kernels starts, and no kernel
    writes the cos/sin table."""
    t = tl.program_id(0).to(tl.int64)
    cos, sin = _cos_sin(cos_sin_ptr, pos_ptr, t, stride_c, HALF, BLOCK_HALF)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    pdl_enter(PDL)
    _rotate_heads(q_ptr, t, stride_qt, stride_qh, num_q_heads, cos, sin, HALF, BLOCK_QH, BLOCK_HALF)
    if slot >= 0:
        h = tl.arange(0, BLOCK_H)[:, None]
        j = tl.arange(0, BLOCK_HALF)[None, :]
        dst = (slot // PAGE) * stride_cb + (slot % PAGE) * stride_cs + h * stride_ch
        mask = (h < num_kv_heads) & (j < HALF)
        k_scale, v_scale = _head_scales(k_scale_ptr, v_scale_ptr, h, num_kv_heads, SCALED)
        src = k_ptr + t * stride_kt + h * stride_kh + j
        r1, r2 = rotate_half(tl.load(src, mask=mask, other=0.0),
                             tl.load(src + HALF, mask=mask, other=0.0), cos, sin)
        # Round to k's dtype first, as rotating k in place and then storing it would.
        r1 = r1.to(k_ptr.dtype.element_ty)
        r2 = r2.to(k_ptr.dtype.element_ty)
        tl.store(k_cache_ptr + dst + j, _to_cache(r1, k_cache_ptr, k_scale, SCALED), mask=mask)
        tl.store(k_cache_ptr + dst + HALF + j, _to_cache(r2, k_cache_ptr, k_scale, SCALED), mask=mask)
        d = tl.arange(0, BLOCK_D)[None, :]
        head = (h < num_kv_heads) & (d < HEAD_DIM)
        tail = head & (d >= 2 * HALF)   # dims past the rotary ones (partial rotary)
        k_tail = tl.load(k_ptr + t * stride_kt + h * stride_kh + d, mask=tail)
        tl.store(k_cache_ptr + dst + d, _to_cache(k_tail, k_cache_ptr, k_scale, SCALED), mask=tail)
        v = tl.load(v_ptr + t * stride_vt + h * stride_vh + d, mask=head)
        tl.store(v_cache_ptr + dst + d, _to_cache(v, v_cache_ptr, v_scale, SCALED), mask=head)


def rotary_store_kv_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                          positions: torch.Tensor, cos_sin_cache: torch.Tensor,
                          kv_scales: KVScales = None) -> None:
    """``apply_rotary_emb(q, k, positions, cos_sin_cache)`` then ``store_kv_cache(k, v,
    ..., kv_scales)`` in one kernel, except that ``k`` keeps its unrotated values (only its
    cache copy is rotated). ``q`` is rotated in place."""
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    check_cache(k_cache, v_cache)
    check_kv_scales(kv_scales, num_kv_heads)
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1
    assert cos_sin_cache.stride(-1) == 1
    half = cos_sin_cache.shape[1] // 2
    block_qh = triton.next_power_of_2(q.shape[1])
    block_half = triton.next_power_of_2(half)
    _rotary_store_kv_kernel[(num_tokens,)](
        q, k, v, k_cache, v_cache, slot_mapping, positions, cos_sin_cache,
        *(kv_scales or (None, None)),
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), cos_sin_cache.stride(0),
        q.shape[1], num_kv_heads,
        PAGE=k_cache.shape[1], HEAD_DIM=head_dim, HALF=half,
        BLOCK_QH=block_qh, BLOCK_H=triton.next_power_of_2(num_kv_heads),
        BLOCK_HALF=block_half, BLOCK_D=triton.next_power_of_2(head_dim),
        SCALED=kv_scales is not None, **pdl_args(q), num_warps=_warps_for(block_qh * block_half),
    )


def check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    """The kernels share one set of strides and index blocks by shift/mask."""
    assert k_cache.shape == v_cache.shape and k_cache.stride() == v_cache.stride(), \
        "k_cache and v_cache must have the same shape and strides"
    assert k_cache.stride(-1) == 1, "cache needs a contiguous head_dim"
    assert math.log2(k_cache.shape[1]).is_integer(), "block_size must be a power of two"


def check_kv_scales(kv_scales: KVScales, num_kv_heads: int) -> None:
    """The kernels read one float32 per KV head from each scale."""
    if kv_scales is None:
        return
    for scale in kv_scales:
        assert scale.dtype == torch.float32 and scale.shape == (num_kv_heads,) and scale.is_contiguous(), \
            f"KV scales must be contiguous float32 [{num_kv_heads}], got {scale.dtype} {tuple(scale.shape)}"
