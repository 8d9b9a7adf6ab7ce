"""Block-wise FP8 checkpoints: ``quantization_config.quant_method == "fp8"`` with
``weight_block_size`` (the official Qwen3 FP8 releases, DeepSeek-V3): E4M3 weights with
a float32 ``weight_scale_inv`` (despite the name, the dequantization multiplier) per
block of 128 x 128, activations quantized dynamically."""
from __future__ import annotations

from dataclasses import dataclass

from orbitllm.layers.quantization.checkpoint_fp8 import (
    UnsupportedQuantization, add_block_scale, add_fp8_weight)
from orbitllm.layers.quantization.fp8 import Fp8WeightMethod


@dataclass(frozen=True)
class Fp8BlockLinearMethod(Fp8WeightMethod):
    block: tuple[int, int]
    scale_name = "weight_scale_inv"

    def create_weights(self, layer, input_size: int, output_size: int, bias: bool) -> None:
        add_fp8_weight(layer, input_size, output_size)
        add_block_scale(layer, "weight_scale_inv", input_size, output_size, self.block)
        layer.add_bias(output_size, bias)


class Fp8BlockConfig:
    """A block-wise checkpoint's config; ``modules_to_not_convert`` stay 16-bit."""

    def __init__(self, qcfg: dict) -> None:
        block = qcfg.get("weight_block_size")
        if not block or len(block) != 2:
            raise UnsupportedQuantization(
                "quantization_config: fp8 checkpoints without weight_block_size (per-tensor "
                "fp8) are not supported; block-wise ([128, 128]) are")
        if qcfg.get("activation_scheme", "dynamic") != "dynamic":
            raise UnsupportedQuantization(
                f"quantization_config: fp8 activation_scheme {qcfg['activation_scheme']!r} "
                "is not supported (dynamic)")
        self.method = Fp8BlockLinearMethod(tuple(block))
        self.ignore = set(qcfg.get("modules_to_not_convert") or [])

    def linear_method(self, hf_names: list[str]) -> Fp8BlockLinearMethod | None:
        if any(n in self.ignore or n.split(".")[-1] in self.ignore for n in hf_names):
            return None
        return self.method
