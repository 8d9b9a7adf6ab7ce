"""Triton kernels for attention over the paged KV cache.

Both kernels use the cache layout of ``kernels/kv_write.py``, ``[num_blocks,
block_size, num_kv_heads, head_dim]`` (see ``orbitllm.layers.attention``), and read
keys/values through the block table one token at a time, so any block size and any
tile size work together:

* ``paged_prefill_attention``: packed variable-length queries (prefill, prefix
  hits, chunked prefill, mixed batches) against all of each sequence's cached
  keys, flash-attention style.
* ``paged_decode_attention``: one query per sequence, with the context split
  over several programs (split-KV) and a reduce, so that small batches with long
  contexts still fill the GPU.

Both attention kernels give each program every query head of one KV head (GQA),
so each K/V tile is loaded once per group rather than once per query head. With
``kv_scales`` (the cache holds K / k_scale and V / v_scale per KV head, see
``kv_write.py``) a program loads its head's two scales once: k_scale multiplies the
softmax scale (scores are linear in K) and v_scale the output (linear in V), so no
tile is rescaled.
Every launch grid comes from shapes and plain Python ints, never from device
values, so the decode path can be captured in a CUDA graph.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from orbitllm.kernels.kv_write import KVScales, check_cache, check_kv_scales
from orbitllm.kernels.pdl import pdl_args, pdl_enter

LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class PrefillConfig:
    """Tile shape of the prefill kernel: ``block_rows`` = query tokens x padded group."""

    block_rows: int
    block_n: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class DecodeConfig:
    """Tile shape of the decode kernel: ``block_n`` keys per iteration."""

    block_n: int
    num_warps: int
    num_stages: int
    reduce_warps: int = 4   # the split reduce's


# ----------------------------------------------------------------------------- shared tile step


@triton.jit
def _attend_tile(
    acc, m_i, l_i, q, q_pos,
    k_cache_ptr, v_cache_ptr, bt_row_ptr, kv_head_off,
    start_n, lo_key, hi_key, sliding_window, scale_log2,
    stride_cb, stride_cs, offs_d, d_mask,
    PAGE: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, SLIDING: tl.constexpr, BOUNDS: tl.constexpr, MASK_D: tl.constexpr,
):
    """Online-softmax update with keys ``start_n .. start_n + BLOCK_N`` of one sequence.

    Keys are gathered token by token through the block table. ``BOUNDS`` masks keys
    outside ``[lo_key, hi_key)``, ``CAUSAL`` keys after each row's position, and
    ``SLIDING`` keys that fell out of each row's window; tiles that need none of
    these skip the mask arithmetic.
    """
    offs_n = start_n + tl.arange(0, BLOCK_N)
    if BOUNDS:
        n_ok = (offs_n >= lo_key) & (offs_n < hi_key)
        blk = tl.load(bt_row_ptr + offs_n // PAGE, mask=n_ok, other=0).to(tl.int64)
    else:
        blk = tl.load(bt_row_ptr + offs_n // PAGE).to(tl.int64)
    kv_off = blk * stride_cb + (offs_n % PAGE) * stride_cs + kv_head_off
    kv_ptrs = kv_off[:, None] + offs_d[None, :]
    if BOUNDS:
        kv_mask = n_ok[:, None] & d_mask[None, :]
        k = tl.load(k_cache_ptr + kv_ptrs, mask=kv_mask, other=0.0)
        v = tl.load(v_cache_ptr + kv_ptrs, mask=kv_mask, other=0.0)
    elif MASK_D:
        k = tl.load(k_cache_ptr + kv_ptrs, mask=d_mask[None, :], other=0.0)
        v = tl.load(v_cache_ptr + kv_ptrs, mask=d_mask[None, :], other=0.0)
    else:
        k = tl.load(k_cache_ptr + kv_ptrs)
        v = tl.load(v_cache_ptr + kv_ptrs)

    return _attend_kv(acc, m_i, l_i, q, q_pos, k, v, offs_n, n_ok if BOUNDS else offs_n,
                      sliding_window, scale_log2, CAUSAL, SLIDING, BOUNDS)


@triton.jit
def _attend_kv(acc, m_i, l_i, q, q_pos, k, v, offs_n, n_ok, sliding_window, scale_log2,
               CAUSAL: tl.constexpr, SLIDING: tl.constexpr, BOUNDS: tl.constexpr):
    """The online-softmax update of ``_attend_tile`` with keys ``offs_n`` already loaded."""
    # float32 runs in full precision (not TF32), so it can serve as a bit-faithful check.
    if q.dtype == tl.float32:
        s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision="ieee") * scale_log2
    else:
        s = tl.dot(q, tl.trans(k.to(q.dtype))) * scale_log2
    if BOUNDS:
        s = tl.where(n_ok[None, :], s, float("-inf"))
    if CAUSAL:
        s = tl.where(offs_n[None, :] <= q_pos[:, None], s, float("-inf"))
    if SLIDING:
        s = tl.where(offs_n[None, :] > q_pos[:, None] - sliding_window, s, float("-inf"))

    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row whose keys are all masked so far keeps m = -inf; shift by 0 to avoid inf - inf.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    if q.dtype == tl.float32:
        acc = acc * alpha[:, None] + tl.dot(p, v.to(q.dtype), input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype))
    return acc, m_new, l_i


# ----------------------------------------------------------------------------- prefill


# Triton compiles one variant per divisibility class (== 1, % 16 == 0, other) of each
# integer argument. The block-table width and split count change from step to step,
# so they are left unspecialized: otherwise a new variant compiles mid-run (seconds
# of stall on a fresh machine) whenever the width first hits a multiple of 16.
@triton.jit(do_not_specialize=["stride_bt"])
def _prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr,
    block_tables_ptr, query_start_loc_ptr, seq_lens_ptr, k_scale_ptr, v_scale_ptr,
    scale_log2, sliding_window,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_cb, stride_cs, stride_ch, stride_bt,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PAGE: tl.constexpr, SLIDING: tl.constexpr,
    KV_SCALED: tl.constexpr,
):
    """Program (q block, sequence, KV head): ``BLOCK_M`` query tokens x the group's heads.

    Rows are (token, head-in-group) pairs, so one K/V tile serves the whole group.
    The q-block axis runs backwards so that the longest (latest) tiles start first.
    """
    q_blk = tl.num_programs(0) - 1 - tl.program_id(0)
    seq = tl.program_id(1)
    kv_head = tl.program_id(2)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    if q_blk * BLOCK_M >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    ctx_len = seq_len - q_len

    rows = tl.arange(0, BLOCK_M * GROUP_PAD)
    tok = q_blk * BLOCK_M + rows // GROUP_PAD
    head = kv_head * GROUP + rows % GROUP_PAD
    row_ok = (tok < q_len) & (rows % GROUP_PAD < GROUP)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    q_rows = (q_start + tok).to(tl.int64) * stride_qt + head * stride_qh
    q = tl.load(q_ptr + q_rows[:, None] + offs_d[None, :],
                mask=row_ok[:, None] & d_mask[None, :], other=0.0)
    q_pos = ctx_len + tok

    first_pos = ctx_len + q_blk * BLOCK_M
    hi = tl.minimum(first_pos + BLOCK_M, seq_len)        # one past the last query position
    lo = 0
    if SLIDING:
        lo = tl.maximum(first_pos - sliding_window + 1, 0)
    lo = (lo // BLOCK_N) * BLOCK_N
    # Keys below ``mid`` are causally visible to every row of the tile.
    mid = tl.maximum(((first_pos + 1) // BLOCK_N) * BLOCK_N, lo)

    bt_row_ptr = block_tables_ptr + seq.to(tl.int64) * stride_bt
    kv_head_off = kv_head.to(tl.int64) * stride_ch
    if KV_SCALED:
        scale_log2 = scale_log2 * tl.load(k_scale_ptr + kv_head)
    m_i = tl.full([BLOCK_M * GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M * GROUP_PAD], tl.float32)
    acc = tl.zeros([BLOCK_M * GROUP_PAD, BLOCK_D], tl.float32)
    for start_n in range(lo, mid, BLOCK_N):
        acc, m_i, l_i = _attend_tile(
            acc, m_i, l_i, q, q_pos, k_cache_ptr, v_cache_ptr, bt_row_ptr, kv_head_off,
            start_n, 0, seq_len, sliding_window, scale_log2, stride_cb, stride_cs, offs_d, d_mask,
            PAGE, BLOCK_N, CAUSAL=False, SLIDING=SLIDING, BOUNDS=False, MASK_D=BLOCK_D != HEAD_DIM)
    for start_n in range(mid, hi, BLOCK_N):
        acc, m_i, l_i = _attend_tile(
            acc, m_i, l_i, q, q_pos, k_cache_ptr, v_cache_ptr, bt_row_ptr, kv_head_off,
            start_n, 0, seq_len, sliding_window, scale_log2, stride_cb, stride_cs, offs_d, d_mask,
            PAGE, BLOCK_N, CAUSAL=True, SLIDING=SLIDING, BOUNDS=True, MASK_D=BLOCK_D != HEAD_DIM)

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    if KV_SCALED:
        out = out * tl.load(v_scale_ptr + kv_head)
    o_rows = (q_start + tok).to(tl.int64) * stride_ot + head * stride_oh
    tl.store(out_ptr + o_rows[:, None] + offs_d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & d_mask[None, :])


def default_prefill_config(head_dim: int, group: int, dtype: torch.dtype,
                           device: torch.device, fp8_cache: bool = False) -> PrefillConfig:
    """Tiles measured on an H100 (8k prompt): for head_dim 64, 128 rows x 64 keys. Float32
    and wide heads get smaller tiles so the K/V pipeline fits in shared memory (227 KB).
    For 16-bit head_dim 128 (an H200, 8k prompt, ``kernels_bench.py --prefill-sweep``;
    figures in ``docs/perf-log.md``): about 64 query tokens x the group per tile, 128 keys
    two deep, and with an FP8 cache, whose tiles are widened in registers, 64 keys two
    deep. Tiny tiles for the CPU interpreter."""
    group_pad = triton.next_power_of_2(group)
    wide = dtype.itemsize > 2
    if device.type != "cuda":
        return PrefillConfig(max(16, group_pad), 16, 4, 1)
    if head_dim > 128:
        return PrefillConfig(max(64 if wide else 128, group_pad), 32, 4 if wide else 8, 2)
    if head_dim <= 64:
        return PrefillConfig(max(128, group_pad), 64, 4, 3)
    if wide:
        return PrefillConfig(max(128, group_pad), 64, 8, 3)
    rows = min(max(128, 64 * group_pad), 256)
    if rows == 128:
        return PrefillConfig(max(rows, group_pad), 128, 8, 3)
    return PrefillConfig(max(rows, group_pad), 64 if fp8_cache else 128, 8, 2)


def paged_prefill_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    query_start_loc: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor,
    max_query_len: int, scale: float, sliding_window: int | None = None,
    out: torch.Tensor | None = None, config: PrefillConfig | None = None,
    kv_scales: KVScales = None,
) -> torch.Tensor:
    """Causal attention of packed queries ``[num_tokens, num_heads, head_dim]``.

    Sequence ``i`` owns rows ``query_start_loc[i]:query_start_loc[i+1]``, its last
    positions out of ``seq_lens[i]``; its keys/values (earlier context and the new
    tokens) must already be in the cache, divided by ``kv_scales`` where given.
    ``max_query_len`` only sizes the grid.
    """
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    out = _prepare_out(q, out)
    if num_tokens == 0:
        return out
    check_cache(k_cache, v_cache)
    check_kv_scales(kv_scales, num_kv_heads)
    group = num_heads // num_kv_heads
    group_pad = triton.next_power_of_2(group)
    cfg = config or default_prefill_config(head_dim, group, q.dtype, q.device,
                                           fp8_cache=k_cache.element_size() == 1)
    block_m = max(cfg.block_rows // group_pad, 1)
    grid = (triton.cdiv(max_query_len, block_m), seq_lens.shape[0], num_kv_heads)
    _prefill_kernel[grid](
        q, k_cache, v_cache, out, block_tables, query_start_loc, seq_lens,
        *(kv_scales or (None, None)), scale * LOG2E, sliding_window or 0,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        GROUP=group, GROUP_PAD=group_pad, BLOCK_M=block_m, BLOCK_N=cfg.block_n,
        HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim), PAGE=k_cache.shape[1],
        SLIDING=sliding_window is not None, KV_SCALED=kv_scales is not None,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out


# ----------------------------------------------------------------------------- decode


@triton.jit(do_not_specialize=["stride_bt"])
def _decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, part_out_ptr, part_lse_ptr,
    block_tables_ptr, query_start_loc_ptr, seq_lens_ptr, k_scale_ptr, v_scale_ptr,
    scale_log2, sliding_window, num_heads,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_cb, stride_cs, stride_ch, stride_bt,
    SPLIT: tl.constexpr, GROUP: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PAGE: tl.constexpr, SLIDING: tl.constexpr,
    KV_SCALED: tl.constexpr, PDL: tl.constexpr,
):
    """Program (sequence, KV head, split): the group's heads over one context partition.

    The visible context ``[lo, seq_len)`` is cut into ``num_programs(2)`` partitions of
    whole tiles, sized per sequence on the device. Without ``SPLIT`` the result goes
    straight to ``out``; otherwise each split writes its normalised partial output and
    log-sum-exp (base 2) for ``_decode_reduce_kernel``. Sequences with no query row or
    ``seq_len == 0`` (CUDA-graph padding) write nothing / zeros and read no cache.

    With PDL the program loads its first tile of keys and values before it waits for
    the kernel before (the KV write): all but the newest position were written by
    earlier steps, and the step's inputs (query rows, lengths, block table) by copies
    before the chain of kernels began. The newest key and value, and the query, are
    read after the wait. So the block table -> keys chain of dependent loads runs while
    the kernel before does, not after it. The KV scales are loaded before the wait too:
    they are the model's, written at load.
    """
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    q_row = tl.load(query_start_loc_ptr + seq)
    has_query = tl.load(query_start_loc_ptr + seq + 1) != q_row
    seq_len = tl.where(has_query, tl.load(seq_lens_ptr + seq), 0)

    lo = 0
    if SLIDING:
        lo = tl.maximum(seq_len - sliding_window, 0)
    lo_tile = (lo // BLOCK_N) * BLOCK_N
    num_splits = tl.num_programs(2)
    part = tl.cdiv(tl.cdiv(seq_len - lo_tile, num_splits), BLOCK_N) * BLOCK_N
    start = lo_tile + split * part
    end = tl.minimum(start + part, seq_len)

    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    bt_row_ptr = block_tables_ptr + seq.to(tl.int64) * stride_bt
    kv_head_off = kv_head.to(tl.int64) * stride_ch
    # The first tile, but for the newest position (the last one; the query's own).
    offs_n = start + tl.arange(0, BLOCK_N)
    n_ok = (offs_n >= lo) & (offs_n < end)
    blk = tl.load(bt_row_ptr + offs_n // PAGE, mask=n_ok, other=0).to(tl.int64)
    kv_ptrs = (blk * stride_cb + (offs_n % PAGE) * stride_cs + kv_head_off)[:, None] + offs_d[None, :]
    old = (n_ok & (offs_n < seq_len - 1))[:, None] & d_mask[None, :]
    k = tl.load(k_cache_ptr + kv_ptrs, mask=old, other=0.0)
    v = tl.load(v_cache_ptr + kv_ptrs, mask=old, other=0.0)
    v_scale = 1.0
    if KV_SCALED:
        scale_log2 = scale_log2 * tl.load(k_scale_ptr + kv_head)
        v_scale = tl.load(v_scale_ptr + kv_head)

    pdl_enter(PDL)
    if not has_query:
        return
    rows = tl.arange(0, ROWS)
    head = kv_head * GROUP + rows
    row_ok = rows < GROUP
    q = tl.load(q_ptr + q_row.to(tl.int64) * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                mask=row_ok[:, None] & d_mask[None, :], other=0.0)
    new = (n_ok & (offs_n == seq_len - 1))[:, None] & d_mask[None, :]
    k = tl.where(new, tl.load(k_cache_ptr + kv_ptrs, mask=new, other=0.0), k)
    v = tl.where(new, tl.load(v_cache_ptr + kv_ptrs, mask=new, other=0.0), v)

    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, BLOCK_D], tl.float32)
    # The query is the last position, so only [lo, end) bounds the keys (no causal mask).
    acc, m_i, l_i = _attend_kv(acc, m_i, l_i, q, 0, k, v, offs_n, n_ok, sliding_window, scale_log2,
                               CAUSAL=False, SLIDING=False, BOUNDS=True)
    for start_n in range(start + BLOCK_N, end, BLOCK_N):
        acc, m_i, l_i = _attend_tile(
            acc, m_i, l_i, q, 0, k_cache_ptr, v_cache_ptr, bt_row_ptr, kv_head_off,
            start_n, lo, end, sliding_window, scale_log2, stride_cb, stride_cs, offs_d, d_mask,
            PAGE, BLOCK_N, CAUSAL=False, SLIDING=False, BOUNDS=True, MASK_D=BLOCK_D != HEAD_DIM)

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    if KV_SCALED:
        out = out * v_scale
    o_mask = row_ok[:, None] & d_mask[None, :]
    if not SPLIT:
        o_ptrs = out_ptr + q_row.to(tl.int64) * stride_ot + head[:, None] * stride_oh + offs_d[None, :]
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=o_mask)
    else:
        part_row = (seq.to(tl.int64) * num_heads + head) * num_splits + split
        tl.store(part_out_ptr + part_row[:, None] * HEAD_DIM + offs_d[None, :], out, mask=o_mask)
        tl.store(part_lse_ptr + part_row, m_i + tl.math.log2(l_i), mask=row_ok)


@triton.jit(do_not_specialize=["num_splits"])
def _decode_reduce_kernel(
    out_ptr, part_out_ptr, part_lse_ptr, query_start_loc_ptr,
    num_heads, num_splits, stride_ot, stride_oh,
    SPLITS_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr,
):
    """Program (sequence, head): merge the splits' partial outputs by their log-sum-exp."""
    pdl_enter(PDL)
    seq = tl.program_id(0)
    head = tl.program_id(1)
    q_row = tl.load(query_start_loc_ptr + seq)
    if tl.load(query_start_loc_ptr + seq + 1) == q_row:
        return
    splits = tl.arange(0, SPLITS_PAD)
    s_ok = splits < num_splits
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    base = (seq.to(tl.int64) * num_heads + head) * num_splits
    lse = tl.load(part_lse_ptr + base + splits, mask=s_ok, other=float("-inf"))
    m = tl.max(lse, 0)
    w = tl.math.exp2(lse - tl.where(m == float("-inf"), 0.0, m))
    parts = tl.load(part_out_ptr + (base + splits)[:, None] * HEAD_DIM + offs_d[None, :],
                    mask=s_ok[:, None] & d_mask[None, :], other=0.0)
    denom = tl.sum(w, 0)
    out = tl.sum(parts * w[:, None], 0) / tl.where(denom == 0.0, 1.0, denom)
    o_ptrs = out_ptr + q_row.to(tl.int64) * stride_ot + head * stride_oh + offs_d
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=d_mask)


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def default_decode_config(head_dim: int, dtype: torch.dtype, device: torch.device,
                          short_split: bool = False) -> DecodeConfig:
    """64-key tiles, 3 stages: at or near the best of the configs swept on an H100 (batch
    64/256, contexts 1k-4k, reading KV at 96-100% of copy bandwidth); narrower tiles where
    wide heads or float32 would overflow shared memory; tiny tiles for the CPU interpreter.
    ``short_split``: a split step whose programs walk at most three tiles each (small
    batches, short contexts) takes 1 stage and a 1-warp reduce: nothing to pipeline.
    With longer splits the 3 stages win (measurements: ``docs/perf-log.md``)."""
    if device.type != "cuda":
        return DecodeConfig(16, 4, 1)
    block_n = 64 if head_dim * dtype.itemsize <= 512 else 32
    return DecodeConfig(block_n, 4, 1, 1) if short_split else DecodeConfig(block_n, 4, 3)


def choose_num_splits(num_seqs: int, num_kv_heads: int, max_seq_len: int,
                      device: torch.device, block_n: int, min_keys_per_split: int = 128) -> int:
    """Enough splits for about two programs per SM, but at least ``min_keys_per_split``
    keys each (shorter splits cost more in the reduce than they save)."""
    programs = max(num_seqs * num_kv_heads, 1)
    want = triton.cdiv(2 * _num_sms(device), programs)
    by_len = max(max_seq_len // max(min_keys_per_split, block_n), 1)
    return max(min(want, by_len, 64), 1)


def paged_decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    query_start_loc: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor,
    max_seq_len: int, scale: float, sliding_window: int | None = None,
    num_splits: int | None = None, out: torch.Tensor | None = None,
    config: DecodeConfig | None = None, kv_scales: KVScales = None,
) -> torch.Tensor:
    """Attention of one query token per sequence (``query_start_loc`` gives its row),
    over a cache divided by ``kv_scales`` where given.

    ``num_splits`` (default: ``choose_num_splits`` from ``max_seq_len``) fixes the grid;
    any value is correct for any ``seq_lens``, so a CUDA graph may bake it in.
    """
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_seqs, num_kv_heads = seq_lens.shape[0], k_cache.shape[2]
    out = _prepare_out(q, out)
    if num_seqs == 0 or q.shape[0] == 0:
        return out
    check_cache(k_cache, v_cache)
    check_kv_scales(kv_scales, num_kv_heads)
    cfg = config or default_decode_config(head_dim, k_cache.dtype, q.device)
    splits = num_splits or choose_num_splits(num_seqs, num_kv_heads, max_seq_len, q.device, cfg.block_n)
    if config is None and splits > 1 and triton.cdiv(max_seq_len, splits) <= 3 * cfg.block_n:
        cfg = default_decode_config(head_dim, k_cache.dtype, q.device, short_split=True)
    group = num_heads // num_kv_heads
    block_d = triton.next_power_of_2(head_dim)
    if splits > 1:
        part_out = torch.empty((num_seqs, num_heads, splits, head_dim), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((num_seqs, num_heads, splits), dtype=torch.float32, device=q.device)
    else:
        part_out = part_lse = out  # unused by the kernel without SPLIT
    _decode_kernel[(num_seqs, num_kv_heads, splits)](
        q, k_cache, v_cache, out, part_out, part_lse, block_tables, query_start_loc, seq_lens,
        *(kv_scales or (None, None)), scale * LOG2E, sliding_window or 0, num_heads,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        SPLIT=splits > 1, GROUP=group, ROWS=max(16, triton.next_power_of_2(group)),
        BLOCK_N=cfg.block_n, HEAD_DIM=head_dim, BLOCK_D=block_d, PAGE=k_cache.shape[1],
        SLIDING=sliding_window is not None, KV_SCALED=kv_scales is not None, **pdl_args(q),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if splits > 1:
        _decode_reduce_kernel[(num_seqs, num_heads)](
            out, part_out, part_lse, query_start_loc, num_heads, splits, out.stride(0), out.stride(1),
            SPLITS_PAD=triton.next_power_of_2(splits),
            HEAD_DIM=head_dim, BLOCK_D=block_d, **pdl_args(q), num_warps=cfg.reduce_warps,
        )
    return out


# ----------------------------------------------------------------------------- helpers


def _prepare_out(q: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    if out is None:
        return torch.empty(q.shape, dtype=q.dtype, device=q.device)
    assert out.shape == q.shape and out.stride(-1) == 1, "out must match q with a contiguous last dim"
    return out
