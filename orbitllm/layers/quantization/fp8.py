"""FP8 weights quantized while a 16-bit checkpoint loads (``quantization="fp8"``).

Each weight is quantized as its loader receives it, one checkpoint tensor (one rank's
slice) at a time: E4M3 with one float32 scale per output channel (its row's amax maps
to 448), so the 16-bit model never exists on the device. Per-channel scales of fused
layers (Q/K/V, gate/up) are just their parts' rows side by side, and a row-parallel
layer's rows are whole on every rank (each rank reads its rows whole to find their amax,
then keeps its columns), so any number of ranks holds the same weights.
"""
from __future__ import annotations

import torch

from orbitllm.layers.matmul import matmul
from orbitllm.layers.quantization.fp8_kernels import (
    FP8_DTYPE, dequantize, fp8_linear, quantize_rows, takes_fp8_gemv)
from orbitllm.layers.weight_loading import CheckpointTensor


class Fp8WeightMethod:
    """What every FP8 method shares: an E4M3 ``weight`` ``[N, K]`` and its float32
    scale (parameter or buffer ``scale_name``), multiplied by ``fp8_linear``."""

    scale_name = "weight_scale"

    def input_scale(self, layer) -> torch.Tensor | None:
        return None

    def init_random(self, layer, gen: torch.Generator) -> None:
        """Random 16-bit weights (as ``init_random_weights`` draws them), quantized per
        row (a block-wise scale takes its row's value in every block)."""
        w = torch.empty(layer.weight.shape, device=layer.weight.device).normal_(0.0, 0.02, generator=gen)
        q, scale = quantize_rows(w)
        layer.weight.data.copy_(q)
        target = getattr(layer, self.scale_name)
        target.data.copy_(scale if target.dim() == 1 else scale[:, None].expand_as(target))

    def uses_gemv(self, layer, x: torch.Tensor) -> bool:
        return takes_fp8_gemv(x)

    def apply(self, layer, x: torch.Tensor, out: torch.Tensor | None = None,
              send=None, silu_mul: bool = False) -> torch.Tensor:
        if not x.is_cuda:
            return matmul(x, self._dequantized(layer, x.dtype), layer.bias, out=out)
        return fp8_linear(x, layer.weight, getattr(layer, self.scale_name), layer.bias,
                          self.input_scale(layer), out=out, send=send, silu_mul=silu_mul)

    def _dequantized(self, layer, dtype: torch.dtype) -> torch.Tensor:
        """The CPU path's weight: dequantized once, at the first product (the CPU has no
        FP8 kernels, and widening E4M3 costs ~20 ns a weight there: seconds a step for a
        135M model). The numbers are those of dequantizing at every call."""
        w = layer.__dict__.get("_dequantized")
        if w is None or w.dtype != dtype:
            w = layer.__dict__["_dequantized"] = dequantize(
                layer.weight, getattr(layer, self.scale_name), dtype)
        return w


class Fp8LinearMethod(Fp8WeightMethod):
    """16-bit checkpoint weights quantized at load, per output channel."""

    def create_weights(self, layer, input_size: int, output_size: int, bias: bool) -> None:
        layer.add_parameter("weight", torch.empty(output_size, input_size, dtype=FP8_DTYPE),
                            loader=self._load_weight(layer))
        # Derived from the weight, not in the checkpoint: a buffer (loading checks that
        # every parameter was filled).
        layer.register_buffer("weight_scale", torch.empty(output_size, dtype=torch.float32))
        layer.keep_dtype.add("weight_scale")
        layer.add_bias(output_size, bias)

    @staticmethod
    def _load_weight(layer):
        def load(param: torch.nn.Parameter, loaded: CheckpointTensor, shard_id) -> None:
            # Whole rows, so a row-parallel rank's scale is the row's: the same weights
            # whatever the number of ranks.
            start, length, size = layer.input_part()
            whole, rows = layer.checkpoint_part((param.shape[0], size), loaded, shard_id, 0, None)
            whole = whole.to(param.device)
            _, scale = quantize_rows(whole)
            q, _ = quantize_rows(whole.narrow(1, start, length), scale)
            param.data.narrow(0, *rows).copy_(q)
            layer.weight_scale.narrow(0, *rows).copy_(scale)
        return load
