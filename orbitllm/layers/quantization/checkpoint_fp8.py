"""Loading a pre-quantized checkpoint's FP8 weights and scales into a layer.

The weight is copied as stored (E4M3, sliced like any weight). Scales are small, so they
are read whole and this rank's part is taken here: a per-tensor scale of a fused layer's
part (Q, K, V; gate, up) fills that part's rows, so every FP8 layer multiplies by one
scale per output channel (or per row and block of 128 inputs), exactly the checkpoint's.
"""
from __future__ import annotations

import torch

from orbitllm.layers.quantization.fp8_kernels import FP8_DTYPE
from orbitllm.layers.weight_loading import CheckpointTensor, take


class UnsupportedQuantization(ValueError):
    """A checkpoint's quantization scheme (or an option) this engine cannot run."""


def add_fp8_weight(layer, input_size: int, output_size: int) -> None:
    """The stored E4M3 weight ``[N, K]``, sliced like a 16-bit one; ValueError when the
    checkpoint's tensor is not E4M3."""
    sliced = layer.sliced_loader(0, 1)

    def load(param: torch.nn.Parameter, loaded: CheckpointTensor, shard_id) -> None:
        dtype = getattr(loaded, "dtype", None)
        if dtype is not None and dtype != FP8_DTYPE:
            raise ValueError(f"is {dtype}, expected {FP8_DTYPE} (an FP8 checkpoint's weight)")
        sliced(param, loaded, shard_id)

    layer.add_parameter("weight", torch.empty(output_size, input_size, dtype=FP8_DTYPE), loader=load)


def add_channel_scale(layer, name: str, output_size: int) -> None:
    """Parameter ``name``: one float32 scale per output channel, from a checkpoint
    tensor of one value (per tensor) or one per output (per channel, ``[N]`` or ``[N, 1]``)."""
    def load(param: torch.nn.Parameter, loaded: CheckpointTensor, shard_id) -> None:
        values = take(loaded).float().reshape(-1)
        offset, start, length, size = layer.output_part(shard_id)
        if values.numel() == 1:
            param.data.narrow(0, offset, length).fill_(values.item())
        elif values.numel() == size:
            param.data.narrow(0, offset, length).copy_(values[start:start + length])
        else:
            raise ValueError(f"has {values.numel()} values, expected 1 (per tensor) "
                             f"or {size} (per channel)")
    layer.add_parameter(name, torch.empty(output_size, dtype=torch.float32), loader=load)
    layer.keep_dtype.add(name)


def add_block_scale(layer, name: str, input_size: int, output_size: int,
                    block: tuple[int, int]) -> None:
    """Parameter ``name``: float32 scales of ``block`` = (rows, cols) blocks, stored per
    output row (``[N, ceil(K / cols)]``) so fused and sliced outputs need no alignment;
    a rank's inputs must start on a block (ValueError otherwise)."""
    rows_per, cols_per = block

    def load(param: torch.nn.Parameter, loaded: CheckpointTensor, shard_id) -> None:
        offset, start, length, size = layer.output_part(shard_id)
        in_start, in_len, in_size = layer.input_part()
        expected = (-(-size // rows_per), -(-in_size // cols_per))
        if tuple(loaded.shape) != expected:
            raise ValueError(f"has shape {tuple(loaded.shape)}, expected {expected} "
                             f"(blocks of {rows_per}x{cols_per})")
        if in_start % cols_per or (in_len % cols_per and in_start + in_len != in_size):
            raise ValueError(f"cannot be split over the ranks: their inputs of {in_len} do not "
                             f"start on blocks of {cols_per}")
        values = take(loaded).float()
        values = values[:, in_start // cols_per:-(-(in_start + in_len) // cols_per)]
        rows = values.repeat_interleave(rows_per, dim=0)[start:start + length]
        param.data.narrow(0, offset, length).copy_(rows)

    layer.add_parameter(name, torch.empty(output_size, -(-input_size // cols_per), dtype=torch.float32),
                        loader=load)
    layer.keep_dtype.add(name)


def add_static_input_scale(layer) -> None:
    """Parameter ``input_scale``: a static per-tensor activation scale per checkpoint
    part of the layer (its fused parts share one input: ``fp8_linear`` takes their max)."""
    def load(param: torch.nn.Parameter, loaded: CheckpointTensor, shard_id) -> None:
        values = take(loaded).float().reshape(-1)
        if values.numel() != 1:
            raise ValueError(f"has {values.numel()} values, expected 1 (a per-tensor input scale)")
        param.data[layer.shard_ids.index(shard_id)] = values[0]
    layer.add_parameter("input_scale", torch.empty(len(layer.shard_ids), dtype=torch.float32),
                        loader=load)
    layer.keep_dtype.add("input_scale")
