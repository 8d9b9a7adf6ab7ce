"""Fused elementwise kernels of the decoder layer, each next to its PyTorch reference.

Fusing saves memory round trips: RMSNorm with the residual add reads x and the
residual once and writes both outputs in one pass; SiLU-and-mul reads the
gate/up projection once; rotary rotates q and k in place for all heads of a
token in one program. Numerics follow transformers' Llama/Qwen modules: math in
float32, rounded to the input dtype where those modules round.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from orbitllm.kernels.pdl import pdl_args, pdl_enter

# ----------------------------------------------------------------------------- RMSNorm


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr,
    stride_x, stride_r, stride_o, stride_ro, n_cols, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr,
):
    """One program per row: optional ``x += residual``, then ``x * rsqrt(mean(x^2) + eps) * w``."""
    pdl_enter(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    _add_norm_store(x, cols, mask, n_cols, eps, res_ptr + row * stride_r, w_ptr,
                    out_ptr + row * stride_o, res_out_ptr + row * stride_ro, HAS_RESIDUAL)


@triton.jit
def _add_norm_store(x, cols, mask, n_cols, eps, res_ptr, w_ptr, out_ptr, res_out_ptr,
                    HAS_RESIDUAL: tl.constexpr):
    """One row (float32 ``x``, pointers at the row's start): optional residual add
    (stored in the model dtype, where the residual stream is kept), then RMSNorm with
    transformers' rounding; shared with the fused all-reduce (``peer_reduce.py``)."""
    if HAS_RESIDUAL:
        x += tl.load(res_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        x = x.to(res_out_ptr.dtype.element_ty)
        tl.store(res_out_ptr + cols, x, mask=mask)
        x = x.to(tl.float32)
    inv_rms = tl.math.rsqrt(tl.sum(x * x, 0) / n_cols + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    y = (x * inv_rms).to(out_ptr.dtype.element_ty).to(tl.float32) * w.to(tl.float32)
    tl.store(out_ptr + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over the last dim. With ``residual``: returns ``(norm(x + residual), x + residual)``.

    Out of place; ``x`` and ``residual`` need a contiguous last dim.
    """
    hidden = x.shape[-1]
    x2 = x.reshape(-1, hidden)
    out = torch.empty_like(x2)
    res2 = res_out = None
    if residual is not None:
        res2 = residual.reshape(-1, hidden)
        res_out = torch.empty_like(x2)
    if x2.shape[0] > 0:
        block = triton.next_power_of_2(hidden)
        _rms_norm_kernel[(x2.shape[0],)](
            x2, res2 if res2 is not None else x2, weight, out, res_out if res_out is not None else out,
            x2.stride(0), res2.stride(0) if res2 is not None else 0, out.stride(0), hidden,
            hidden, eps,
            HAS_RESIDUAL=residual is not None, BLOCK=block, **pdl_args(x2),
            num_warps=_warps_for(block),
        )
    if residual is None:
        return out.view(x.shape)
    return out.view(x.shape), res_out.view(x.shape)


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """PyTorch reference of ``rms_norm`` (transformers' LlamaRMSNorm numerics)."""
    if residual is not None:
        x = x + residual
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    out = weight * h.to(x.dtype)
    return out if residual is None else (out, x)


# ----------------------------------------------------------------------------- SiLU and mul


@triton.jit
def silu_mul(gate, up):
    """``silu(gate) * up`` in float32: the one expression of the activation, shared by
    ``_silu_and_mul_kernel`` and the GEMV that fuses it, so both round alike."""
    gate = gate.to(tl.float32)
    return gate / (1.0 + tl.exp(-gate)) * up.to(tl.float32)


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, n_cols, BLOCK: tl.constexpr,
                         PDL: tl.constexpr):
    """Program (row, column block): ``silu(x[:, :I]) * x[:, I:]``."""
    pdl_enter(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * stride_x + n_cols + cols, mask=mask, other=0.0)
    y = silu_mul(gate, up)
    tl.store(out_ptr + row * stride_o + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``[..., 2*I] -> [..., I]``: SiLU of the first half (gate) times the second (up)."""
    inter = x.shape[-1] // 2
    x2 = x.reshape(-1, 2 * inter)
    out = torch.empty((x2.shape[0], inter), dtype=x.dtype, device=x.device)
    if x2.shape[0] > 0:
        block = min(triton.next_power_of_2(inter), 1024)
        _silu_and_mul_kernel[(x2.shape[0], triton.cdiv(inter, block))](
            x2, out, x2.stride(0), out.stride(0), inter, BLOCK=block, **pdl_args(x2),
            num_warps=4)
    return out.view(*x.shape[:-1], inter)


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """PyTorch reference of ``silu_and_mul``."""
    gate, up = x.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


# ----------------------------------------------------------------------------- rotary


@triton.jit
def rotate_half(x1, x2, cos, sin):
    """(x1, x2) -> (x1 c - x2 s, x2 c + x1 s) in float32: the one expression of the
    rotation, shared by the rotary kernels, so all round alike."""
    x1 = x1.to(tl.float32)
    x2 = x2.to(tl.float32)
    return x1 * cos - x2 * sin, x2 * cos + x1 * sin


@triton.jit
def _rotate_heads(x_ptr, t, stride_t, stride_h, num_heads, cos, sin,
                  HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """Rotate-half in place for all heads of token ``t``: (x1, x2) -> (x1 c - x2 s, x2 c + x1 s)."""
    h = tl.arange(0, BLOCK_H)[:, None]
    j = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (h < num_heads) & (j < HALF)
    p1 = x_ptr + t * stride_t + h * stride_h + j
    r1, r2 = rotate_half(tl.load(p1, mask=mask, other=0.0), tl.load(p1 + HALF, mask=mask, other=0.0),
                         cos, sin)
    tl.store(p1, r1.to(x_ptr.dtype.element_ty), mask=mask)
    tl.store(p1 + HALF, r2.to(x_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _cos_sin(cache_ptr, pos_ptr, t, stride_c, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """cos and sin ``[1, BLOCK_HALF]`` (float32) at token ``t``'s position."""
    pos = tl.load(pos_ptr + t).to(tl.int64)
    j = tl.arange(0, BLOCK_HALF)[None, :]
    cos = tl.load(cache_ptr + pos * stride_c + j, mask=j < HALF, other=0.0).to(tl.float32)
    sin = tl.load(cache_ptr + pos * stride_c + HALF + j, mask=j < HALF, other=0.0).to(tl.float32)
    return cos, sin


@triton.jit
def _rotary_kernel(
    q_ptr, k_ptr, pos_ptr, cache_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_c,
    num_q_heads, num_k_heads,
    HALF: tl.constexpr, BLOCK_QH: tl.constexpr, BLOCK_KH: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    """One program per token: look up cos/sin at its position once, rotate q and k."""
    t = tl.program_id(0).to(tl.int64)
    cos, sin = _cos_sin(cache_ptr, pos_ptr, t, stride_c, HALF, BLOCK_HALF)
    _rotate_heads(q_ptr, t, stride_qt, stride_qh, num_q_heads, cos, sin, HALF, BLOCK_QH, BLOCK_HALF)
    _rotate_heads(k_ptr, t, stride_kt, stride_kh, num_k_heads, cos, sin, HALF, BLOCK_KH, BLOCK_HALF)


def apply_rotary_emb(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                     cos_sin_cache: torch.Tensor) -> None:
    """Rotate ``q [T, Hq, D]`` and ``k [T, Hk, D]`` in place (neox / rotate-half style).

    ``cos_sin_cache`` is ``[max_position, rotary_dim]`` float32, cos of each frequency
    then sin (as ``RotaryEmbedding.build_cache`` makes it); only the first
    ``rotary_dim`` dims of each head rotate (partial rotary). ``positions`` is ``[T]`` integer; ``q``/``k`` may be strided
    views (e.g. of a fused qkv output) with a contiguous last dim.
    """
    num_tokens = q.shape[0]
    if num_tokens == 0:
        return
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and cos_sin_cache.stride(-1) == 1
    half = cos_sin_cache.shape[1] // 2
    block_half = triton.next_power_of_2(half)
    block_qh = triton.next_power_of_2(q.shape[1])
    _rotary_kernel[(num_tokens,)](
        q, k, positions, cos_sin_cache,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos_sin_cache.stride(0),
        q.shape[1], k.shape[1],
        HALF=half, BLOCK_QH=block_qh, BLOCK_KH=triton.next_power_of_2(k.shape[1]),
        BLOCK_HALF=block_half, num_warps=_warps_for(block_qh * block_half),
    )


def apply_rotary_emb_ref(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                         cos_sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch reference of ``apply_rotary_emb``; returns rotated copies."""
    rot = cos_sin_cache.shape[1]
    cos, sin = cos_sin_cache[positions].chunk(2, dim=-1)
    cos = torch.cat([cos, cos], dim=-1)[:, None, :]
    sin = torch.cat([sin, sin], dim=-1)[:, None, :]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        xr = x[..., :rot].float()
        x1, x2 = xr.chunk(2, dim=-1)
        rotated = xr * cos + torch.cat([-x2, x1], dim=-1) * sin
        return torch.cat([rotated.to(x.dtype), x[..., rot:]], dim=-1)

    return rotate(q), rotate(k)


def _warps_for(elements: int) -> int:
    """More warps for wide rows, so each thread keeps a few elements in registers."""
    return max(1, min(16, elements // 512))


# ----------------------------------------------------------------------------- argmax, sampling

ARGMAX_BLOCK = 2048


@triton.jit
def _argmax_blocks_kernel(x_ptr, temp_ptr, seed_ptr, val_ptr, idx_ptr, n_cols, stride_x, n_blocks,
                          BLOCK: tl.constexpr, SAMPLE: tl.constexpr):
    """Program (row, block): the block's largest value and its first index. NaN counts
    as the largest (as in torch.argmax). ``SAMPLE``: rows whose temperature is above 0
    take ``x / temperature + g`` instead, g Gumbel(0, 1) noise from Philox keyed by the
    row's seed and the column, so the row's argmax is a draw from softmax(x / T)."""
    row = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)
    cols = block * BLOCK + tl.arange(0, BLOCK)
    ok = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=float("-inf")).to(tl.float32)
    x = tl.where(x != x, float("inf"), x)
    if SAMPLE:
        temp = tl.load(temp_ptr + row)
        if temp > 0:
            u = tl.rand(tl.load(seed_ptr + row), cols)
            x = tl.where(ok, x / temp - tl.log(-tl.log(u)), x)
    top = tl.max(x, 0)
    first = tl.min(tl.where(x == top, cols, n_cols), 0)   # masked lanes come after every real one
    tl.store(val_ptr + row * n_blocks + block, top)
    tl.store(idx_ptr + row * n_blocks + block, first)


@triton.jit
def _argmax_rows_kernel(val_ptr, idx_ptr, out_ptr, n_blocks, BLOCK_B: tl.constexpr):
    """One program per row: the first of the blocks holding the row's largest value."""
    row = tl.program_id(0).to(tl.int64)
    blocks = tl.arange(0, BLOCK_B)
    ok = blocks < n_blocks
    val = tl.load(val_ptr + row * n_blocks + blocks, mask=ok, other=float("-inf"))
    idx = tl.load(idx_ptr + row * n_blocks + blocks, mask=ok, other=2147483647)
    top = tl.max(val, 0)
    tl.store(out_ptr + row, tl.min(tl.where(ok & (val == top), idx, 2147483647), 0).to(tl.int64))


def argmax(x: torch.Tensor) -> torch.Tensor:
    """``x.argmax(-1)`` for ``x [rows, n]`` (int64 ``[rows]``). torch reduces a row in one
    thread block, slow for one row of a 128k vocabulary next to a single request's decode
    step; here the row is split over many programs."""
    return _row_argmax(x, None, None)


def gumbel_sample(x: torch.Tensor, temperature: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
    """One token per row of logits ``x [rows, n]``: drawn from softmax(x / temperature)
    (the Gumbel-max trick: argmax of x / T plus Gumbel noise), or the argmax where the
    row's temperature is 0. ``seeds`` (int64 per row) key the noise, so a row's draw
    depends on its seed alone. One read of the logits, where softmax, noise and a
    division as separate kernels read and write ``[rows, n]`` floats five times."""
    return _row_argmax(x, temperature, seeds)


def _row_argmax(x: torch.Tensor, temperature: torch.Tensor | None,
                seeds: torch.Tensor | None) -> torch.Tensor:
    assert x.dim() == 2
    x = x.contiguous()
    rows, n = x.shape
    out = torch.empty(rows, dtype=torch.int64, device=x.device)
    if rows == 0:
        return out
    block = min(ARGMAX_BLOCK, triton.next_power_of_2(n))
    n_blocks = triton.cdiv(n, block)
    vals = torch.empty((rows, n_blocks), dtype=torch.float32, device=x.device)
    idxs = torch.empty((rows, n_blocks), dtype=torch.int32, device=x.device)
    sample = temperature is not None
    _argmax_blocks_kernel[(rows, n_blocks)](
        x, temperature if sample else vals, seeds if sample else idxs, vals, idxs, n, x.stride(0),
        n_blocks, BLOCK=block, SAMPLE=sample, num_warps=8)
    _argmax_rows_kernel[(rows,)](vals, idxs, out, n_blocks,
                                 BLOCK_B=triton.next_power_of_2(n_blocks), num_warps=4)
    return out
