"""Quantized linear layers: which method each projection uses, from the engine's
``quantization`` option and the checkpoint's ``quantization_config``.

* ``quantization="fp8"`` on a 16-bit checkpoint: ``fp8.Fp8LinearMethod`` (quantized at load).
* ``quant_method: "compressed-tensors"``: ``compressed_tensors`` (FP8 schemes).
* ``quant_method: "fp8"`` with ``weight_block_size``: ``fp8_block`` (Qwen3-FP8's format).

A config whose ``kv_scales`` is true (compressed-tensors' ``kv_cache_scheme``) also gives
every attention layer its checkpoint K/V scales (``Attention.add_kv_scales``).

A checkpoint's own quantization is used whether or not ``quantization`` is given
(``"fp8"`` is accepted for an FP8 checkpoint); the model is built with 16-bit layers on
the meta device, and ``quantize_model`` swaps in the methods before any memory exists.
The LM head and the embedding stay 16-bit.
"""
from __future__ import annotations

import torch
from torch import nn

from orbitllm.layers.attention import Attention
from orbitllm.layers.linear import LinearBase
from orbitllm.layers.quantization.checkpoint_fp8 import UnsupportedQuantization
from orbitllm.layers.quantization.compressed_tensors import CompressedTensorsConfig
from orbitllm.layers.quantization.fp8 import Fp8LinearMethod
from orbitllm.layers.quantization.fp8_block import Fp8BlockConfig
from orbitllm.layers.quantization.fp8_kernels import FP8_DTYPE, check_fp8_device

_CHECKPOINT_SCALES = ("weight_scale", "weight_scale_inv", "input_scale", "k_scale", "v_scale")

__all__ = ["UnsupportedQuantization", "check_fp8_device", "quantization_config",
           "quantize_model", "cast_model", "keeps_stored_dtype"]


class OnlineFp8Config:
    """``quantization="fp8"`` on a 16-bit checkpoint: every projection."""

    def linear_method(self, hf_names: list[str]) -> Fp8LinearMethod:
        return Fp8LinearMethod()


def quantization_config(quantization: str | None, hf_config):
    """The quantization to build the model with, or None (16-bit): ``quantization`` is
    None or "fp8" (``EngineConfig`` checks it). UnsupportedQuantization (a ValueError)
    names a checkpoint scheme this engine cannot run."""
    qcfg = getattr(hf_config, "quantization_config", None)
    if qcfg is None:
        return OnlineFp8Config() if quantization == "fp8" else None
    if not isinstance(qcfg, dict):
        qcfg = qcfg.to_dict()
    method = qcfg.get("quant_method")
    if method == "compressed-tensors":
        return CompressedTensorsConfig(qcfg)
    if method == "fp8":
        return Fp8BlockConfig(qcfg)
    raise UnsupportedQuantization(
        f"quantization_config: checkpoint quant_method {method!r} is not supported "
        "(compressed-tensors FP8, block-wise fp8)")


def quantize_model(model: nn.Module, qconfig, hf_names) -> None:
    """Give every projection its quantized method (the model still on the meta device),
    and every attention layer KV scales where the checkpoint has them.
    ``hf_names(module_name)``: the checkpoint modules a layer holds (several if fused)."""
    for name, module in model.named_modules():
        if isinstance(module, LinearBase):
            method = qconfig.linear_method(hf_names(name))
            if method is not None:
                module.set_quant_method(method)
        elif isinstance(module, Attention) and getattr(qconfig, "kv_scales", False):
            module.add_kv_scales()


def cast_model(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``model.to(dtype)`` for 16/32-bit floating tensors, except FP8 ones and the
    scales a layer keeps in float32 (``keep_dtype``)."""
    for module in model.modules():
        keep = getattr(module, "keep_dtype", ())
        for table in (module._parameters, module._buffers):
            for name, t in table.items():
                if (t is not None and t.is_floating_point() and t.element_size() > 1
                        and name not in keep):
                    t.data = t.data.to(dtype)
    return model


def keeps_stored_dtype(name: str, stored: torch.dtype) -> bool:
    """Checkpoint tensors read as stored rather than in the model's dtype: FP8 weights
    and their float32 scales."""
    return stored == FP8_DTYPE or name.rpartition(".")[2] in _CHECKPOINT_SCALES
