"""What a layer's weight loader is handed: a checkpoint tensor, in memory or still on disk.

A tensor-parallel rank needs only its slice of most tensors. Safetensors files are read
lazily (``LazyTensor``), so a loader that narrows the tensor reads only that slice from
disk; GGUF weights arrive dequantized, as plain tensors. Loaders see both through
``take`` and never care which they got.
"""
from __future__ import annotations

from typing import Callable, Union

import torch


class LazyTensor:
    """A checkpoint tensor not read yet: its shape, the dtype reads return it in, and
    reads of all of it or of a slice (one ``slice`` per leading dim)."""

    def __init__(self, shape: tuple[int, ...], read: Callable[[], torch.Tensor],
                 read_slice: Callable[[tuple[slice, ...]], torch.Tensor],
                 dtype: torch.dtype | None = None) -> None:
        self.shape, self.dtype = tuple(shape), dtype
        self._read, self._read_slice = read, read_slice

    def read(self) -> torch.Tensor:
        return self._read()

    def read_slice(self, index: tuple[slice, ...]) -> torch.Tensor:
        return self._read_slice(index)


CheckpointTensor = Union[torch.Tensor, LazyTensor]


def take(t: CheckpointTensor, parts: dict[int, tuple[int, int]] | None = None) -> torch.Tensor:
    """``t`` narrowed to ``parts`` (dim -> (start, length)); parts that cover their whole
    dim are no narrowing, so a replicated tensor is read whole."""
    parts = {d: p for d, p in (parts or {}).items() if p != (0, t.shape[d])}
    if isinstance(t, torch.Tensor):
        for dim, (start, length) in parts.items():
            t = t.narrow(dim, start, length)
        return t
    if not parts:
        return t.read()
    index = []
    for dim in range(max(parts) + 1):
        start, length = parts.get(dim, (0, t.shape[dim]))
        index.append(slice(start, start + length))
    return t.read_slice(tuple(index))


def check_shape(t: CheckpointTensor, expected: tuple[int, ...]) -> None:
    """Raise ValueError when the checkpoint's tensor is not of the shape the layer expects
    (the caller adds the tensor's name)."""
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"has shape {tuple(t.shape)}, expected {tuple(expected)}")


def default_weight_loader(param: torch.Tensor, loaded: CheckpointTensor, shard_id=None) -> None:
    """A parameter every rank holds whole (norms): the checkpoint tensor as it is."""
    assert shard_id is None, "a replicated parameter has no shards"
    check_shape(loaded, tuple(param.shape))
    param.data.copy_(take(loaded))
