"""The FP8 (E4M3) products ``x @ dequant(W).T (+ b)`` and the quantizers they share.

The one place that picks a kernel for an FP8 weight: on a CUDA GPU with FP8 tensor cores
(compute capability 8.9+) the decode GEMV (``kernels/gemv.py``, FP8 weights dequantized
in registers, per-channel or block-wise scales) takes one-row products, and
``torch._scaled_mm`` (cuBLASLt, activations quantized per token) the others of
per-channel weights; elsewhere (CPU, and block-wise weights in steps of several rows,
which ``_scaled_mm`` takes only in per-tensor or row-wise form) the weight is
dequantized and multiplied in the activation dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from orbitllm.layers.matmul import gemv_enabled

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max   # 448
_MIN_SCALE = 1e-12                     # an all-zero row keeps a finite scale


def quantize_rows(w: torch.Tensor, scale: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """E4M3 ``w`` with one float32 scale per row (row amax -> 448, unless ``scale`` is
    given): (q, scale [rows])."""
    w = w.float()
    if scale is None:
        scale = (w.abs().amax(dim=-1) / FP8_MAX).clamp(min=_MIN_SCALE)
    q = (w / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def quantize_per_token(x: torch.Tensor, static_scale: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """E4M3 activations and their float32 scales ``[rows, 1]``: one per row (token)
    from its amax (on CUDA one Triton kernel, ``kernels/fp8_quant.py``, the same numbers),
    or the checkpoint's static per-tensor scale for every row."""
    if static_scale is None and x.is_cuda:
        from orbitllm.kernels.fp8_quant import quantize_rows_fp8
        return quantize_rows_fp8(x)
    if static_scale is None:
        scale = (x.abs().amax(dim=-1, keepdim=True).float() / FP8_MAX).clamp(min=_MIN_SCALE)
    else:
        scale = static_scale.float().reshape(1, 1).expand(x.shape[0], 1).contiguous()
    q = (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def dequantize(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``weight`` (E4M3 ``[N, K]``) times its scale, rounded once to ``dtype``: ``scale``
    is ``[N]`` (per output channel) or ``[N, ceil(K / block)]`` (per row of blocks)."""
    w = weight.float()
    if scale.dim() == 1:
        return (w * scale[:, None]).to(dtype)
    block = -(-weight.shape[1] // scale.shape[1])
    return (w * scale.repeat_interleave(block, dim=1)[:, :weight.shape[1]]).to(dtype)


def supports_fp8(device: torch.device) -> bool:
    """Whether products on ``device`` run on FP8 tensor cores (CUDA, capability 8.9+)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def check_fp8_device(device: torch.device, what: str) -> None:
    """ValueError naming the option when a CUDA GPU has no FP8 tensor cores (the
    CPU path dequantizes and runs anywhere)."""
    if device.type == "cuda" and not supports_fp8(device):
        major, minor = torch.cuda.get_device_capability(device)
        raise ValueError(f"{what}: FP8 needs a GPU with FP8 tensor cores (compute capability "
                         f">= 8.9, e.g. Ada or Hopper); {torch.cuda.get_device_name(device)} "
                         f"has {major}.{minor}")


def takes_fp8_gemv(x: torch.Tensor) -> bool:
    """Whether ``fp8_linear`` runs this product on the Triton FP8 GEMV."""
    return (x.is_cuda and x.shape[0] == 1 and x.dtype in (torch.bfloat16, torch.float16)
            and gemv_enabled())


def scaled_mm(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
              bias: torch.Tensor | None, input_scale: torch.Tensor | None) -> torch.Tensor:
    """The FP8 tensor-core GEMM: ``x`` quantized per token (or with the static scale),
    the per-channel weight as it is; on CUDA up to a few hundred rows the Triton GEMM
    (``kernels/fp8_gemm.py``) where its tiles beat cuBLAS, else row-wise scaled
    ``torch._scaled_mm`` (cuBLASLt on CUDA, where it needs bfloat16 output; it also runs
    on CPU, where tests check it).
    Fast accumulation (Hopper's FP8 sums without the periodic float32 promotion, as
    vLLM's FP8 kernels use): faster at the same error against a float32 product
    (``scaled_mm_bench.py``, figures in ``docs/perf-log.md``)."""
    xq, x_scale = quantize_per_token(x, input_scale)
    if x.is_cuda:
        from orbitllm.kernels.fp8_gemm import fp8_gemm, fp8_gemm_config
        cfg = fp8_gemm_config(x.shape[0], *weight.shape)
        if cfg is not None:
            return fp8_gemm(xq, x_scale, weight, scale, bias, x.dtype, cfg)
    return torch._scaled_mm(xq, weight.t(), scale_a=x_scale, scale_b=scale.reshape(1, -1),
                            bias=bias, out_dtype=x.dtype, use_fast_accum=True)


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
               bias: torch.Tensor | None = None, input_scale: torch.Tensor | None = None,
               out: torch.Tensor | None = None, send=None, silu_mul: bool = False) -> torch.Tensor:
    """``x @ dequantize(weight, scale).T (+ bias)`` in ``x``'s dtype (into ``out`` when
    given). ``input_scale``: a checkpoint's static activation scale (else per token).
    ``send`` / ``silu_mul``: only where ``takes_fp8_gemv`` (see ``matmul.matmul``)."""
    if takes_fp8_gemv(x):
        from orbitllm.kernels.gemv import gemv
        return gemv(x, weight, bias, out, send=send, silu_mul=silu_mul, weight_scale=scale)
    assert send is None and not silu_mul, "only the Triton GEMV sends to peers or fuses SiLU"
    n, k = weight.shape
    if x.is_cuda and scale.dim() == 1 and x.dtype == torch.bfloat16 and n % 16 == 0 and k % 16 == 0:
        y = scaled_mm(x, weight, scale, bias, input_scale)
    else:
        y = F.linear(x, dequantize(weight, scale, x.dtype), bias)
    if out is None:
        return y
    return out.copy_(y)
