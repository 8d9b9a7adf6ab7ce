"""Checkpoints written by the ``compressed-tensors`` library (llm-compressor's FP8
recipes): ``quantization_config.quant_method == "compressed-tensors"``.

Supported: float8 (E4M3, 8 bits, symmetric) weights with ``weight_scale`` per tensor,
per channel or per block, and activations quantized dynamically per token or with a
static per-tensor ``input_scale``; a static float8 ``kv_cache_scheme`` per tensor or per
KV head (``attn_head``), whose ``self_attn.k_scale`` / ``v_scale`` the attention layers
load (used with ``kv_cache_dtype="fp8"``; see ``Attention``). Every other scheme is
refused by name.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

import torch

from orbitllm.layers.quantization.checkpoint_fp8 import (
    UnsupportedQuantization, add_block_scale, add_channel_scale, add_fp8_weight,
    add_static_input_scale)
from orbitllm.layers.quantization.fp8 import Fp8WeightMethod


@dataclass(frozen=True)
class CompressedTensorsFp8Method(Fp8WeightMethod):
    strategy: str                          # tensor | channel | block
    block: tuple[int, int] | None = None
    static_input: bool = False

    def create_weights(self, layer, input_size: int, output_size: int, bias: bool) -> None:
        add_fp8_weight(layer, input_size, output_size)
        if self.strategy == "block":
            add_block_scale(layer, "weight_scale", input_size, output_size, self.block)
        else:
            add_channel_scale(layer, "weight_scale", output_size)
        if self.static_input:
            add_static_input_scale(layer)
        layer.add_bias(output_size, bias)

    def input_scale(self, layer) -> torch.Tensor | None:
        return layer.input_scale.max() if self.static_input else None


class CompressedTensorsConfig:
    """The checkpoint's config groups resolved to one FP8 method; ``ignore``d layers
    stay 16-bit."""

    def __init__(self, qcfg: dict) -> None:
        self.kv_scales = _kv_scales(qcfg.get("kv_cache_scheme"))
        self.ignore = list(qcfg.get("ignore") or [])
        groups = qcfg.get("config_groups") or {}
        if not groups and self.kv_scales:   # KV scales only: the weights stay 16-bit
            self.method = None
            return
        fmt = qcfg.get("format")
        if fmt not in ("float-quantized", "naive-quantized"):
            raise UnsupportedQuantization(
                f"quantization_config: compressed-tensors format {fmt!r} is not supported "
                "(only float-quantized FP8)")
        if not groups:
            raise UnsupportedQuantization("quantization_config: compressed-tensors config has no config_groups")
        methods = {self._method(name, g) for name, g in groups.items()}
        if len(methods) > 1:
            raise UnsupportedQuantization(
                "quantization_config: compressed-tensors config groups with different schemes "
                f"({', '.join(sorted(groups))}) are not supported")
        self.method = methods.pop()

    @staticmethod
    def _method(group: str, g: dict) -> CompressedTensorsFp8Method:
        w, a = g.get("weights") or {}, g.get("input_activations")
        where = f"quantization_config: config group {group!r}"
        if not w or w.get("type") != "float" or w.get("num_bits") != 8 or not w.get("symmetric", True):
            raise UnsupportedQuantization(
                f"{where}: weight scheme {w.get('type')}{w.get('num_bits')} is not supported "
                "(only symmetric float8 weights)")
        strategy = w.get("strategy")
        if strategy not in ("tensor", "channel", "block") or w.get("dynamic"):
            raise UnsupportedQuantization(f"{where}: weight strategy {strategy!r} is not supported "
                                          "(tensor, channel or block)")
        block = tuple(w.get("block_structure") or ()) if strategy == "block" else None
        if strategy == "block" and len(block) != 2:
            raise UnsupportedQuantization(f"{where}: block weights need a 2-d block_structure")
        static = False
        if a is not None:
            if a.get("type") != "float" or a.get("num_bits") != 8:
                raise UnsupportedQuantization(
                    f"{where}: activation scheme {a.get('type')}{a.get('num_bits')} is not supported")
            static = not a.get("dynamic", False)
            if static and a.get("strategy") != "tensor":
                raise UnsupportedQuantization(
                    f"{where}: static activation strategy {a.get('strategy')!r} is not supported (tensor)")
        return CompressedTensorsFp8Method(strategy, block, static)

    def linear_method(self, hf_names: list[str]) -> CompressedTensorsFp8Method | None:
        """The method of the layer holding checkpoint modules ``hf_names`` (several for a
        fused layer), or None where they are ignored."""
        ignored = [n for n in hf_names if any(_matches(rule, n) for rule in self.ignore)]
        if not ignored or self.method is None:
            return self.method
        if len(ignored) < len(hf_names):
            raise UnsupportedQuantization(
                f"quantization_config: ignore lists {ignored} but not the other parts of "
                f"their fused layer {hf_names}")
        return None


def _kv_scales(scheme: dict | None) -> bool:
    """Whether the checkpoint has KV scales: a static symmetric float8 ``kv_cache_scheme``,
    one scale per tensor or per KV head (``attn_head``); any other scheme is refused."""
    if not scheme:
        return False
    if (scheme.get("type") != "float" or scheme.get("num_bits") != 8 or scheme.get("dynamic")
            or not scheme.get("symmetric", True) or scheme.get("strategy") not in ("tensor", "attn_head")):
        raise UnsupportedQuantization(
            f"quantization_config: kv_cache_scheme {json.dumps(scheme, sort_keys=True)} is not "
            "supported (only static symmetric float8, strategy tensor or attn_head)")
    return True


def _matches(rule: str, name: str) -> bool:
    if rule.startswith("re:"):
        return re.match(rule[3:], name) is not None
    return rule == name
