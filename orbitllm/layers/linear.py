"""The model's projections as layers that own their tensor-parallel slice, their weights
and their kernel.

Megatron-style: column-parallel layers (``ColumnParallelLinear``, the fused
``QKVParallelLinear`` and ``MergedColumnParallelLinear``) hold a part of the outputs and
need no communication; ``RowParallelLinear`` holds a part of the inputs and returns this
rank's partial sum, which the ``RMSNorm`` after it sums over the ranks (fused with the
residual add and the norm). A layer's ``quant_method`` creates its parameters and
computes its product (``UnquantizedLinearMethod``: 16-bit or float32 weights, the decode
GEMV or cuBLAS); a quantized method adds parameters (a scale) and picks its own kernel.
Each parameter has a weight loader: given the checkpoint tensor of one shard id (``q``,
``k``, ``v`` of a QKV layer, 0 and 1 of gate/up) it checks its shape and copies this
rank's slice, reading no more of it than that slice (``weight_loading.take``).
"""
from __future__ import annotations

from typing import Callable, Protocol

import torch
from torch import nn

from orbitllm.layers.activation import SiluAndMul
from orbitllm.layers.matmul import matmul, takes_gemv
from orbitllm.layers.tensor_parallel import Shard, first_kv_head, kv_heads_per_rank
from orbitllm.layers.weight_loading import CheckpointTensor, check_shape, take

WeightLoader = Callable[[nn.Parameter, CheckpointTensor, object], None]


class LinearMethod(Protocol):
    """How a linear layer stores its weights and computes ``x @ W.T (+ b)``."""

    def create_weights(self, layer: "LinearBase", input_size: int, output_size: int,
                       bias: bool) -> None:
        """Register this rank's parameters on ``layer`` (``layer.add_parameter``)."""

    def uses_gemv(self, layer: "LinearBase", x: torch.Tensor) -> bool:
        """Whether ``apply`` on ``x`` runs the decode GEMV, the kernel that can also
        fuse the SiLU·mul of its input and send its output to the peers."""

    def apply(self, layer: "LinearBase", x: torch.Tensor, out: torch.Tensor | None = None,
              send=None, silu_mul: bool = False) -> torch.Tensor:
        """The product, written into ``out`` when given; ``send`` and ``silu_mul`` only
        where ``uses_gemv``."""


class UnquantizedLinearMethod:
    """Weights in the model's dtype; the Triton GEMV for one-row steps of 16-bit weights
    on a GPU, cuBLAS (or the CPU's matmul) otherwise."""

    def create_weights(self, layer: "LinearBase", input_size: int, output_size: int,
                       bias: bool) -> None:
        # Allocated uninitialized: the checkpoint (or a random init) fills them.
        layer.add_parameter("weight", torch.empty(output_size, input_size), output_dim=0, input_dim=1)
        layer.add_bias(output_size, bias)

    def uses_gemv(self, layer: "LinearBase", x: torch.Tensor) -> bool:
        return takes_gemv(x, layer.weight)

    def apply(self, layer: "LinearBase", x: torch.Tensor, out: torch.Tensor | None = None,
              send=None, silu_mul: bool = False) -> torch.Tensor:
        return matmul(x, layer.weight, layer.bias, out=out, send=send, silu_mul=silu_mul)


class LinearBase(nn.Module):
    """A projection of this rank's ``input_size`` inputs to its ``output_size`` outputs.
    Subclasses say where this rank's part lies in the checkpoint's tensors."""

    shard_ids: tuple = (None,)   # the checkpoint tensors fused into this layer's parameters

    def __init__(self, input_size: int, output_size: int, shard: Shard, bias: bool,
                 quant_method: LinearMethod | None) -> None:
        super().__init__()
        self.input_size, self.output_size, self.shard = input_size, output_size, shard
        self.weight_loaders: dict[str, WeightLoader] = {}
        self.keep_dtype: set[str] = set()   # tensors not cast to the model's dtype (scales)
        self.quant_method = quant_method or UnquantizedLinearMethod()
        self.quant_method.create_weights(self, input_size, output_size, bias)

    def add_parameter(self, name: str, tensor: torch.Tensor, output_dim: int | None = None,
                      input_dim: int | None = None, loader: WeightLoader | None = None) -> None:
        """Register a parameter whose ``output_dim`` / ``input_dim`` follow the layer's
        outputs / inputs (sliced like them), or one with its own ``loader``."""
        self.register_parameter(name, nn.Parameter(tensor))
        self.weight_loaders[name] = loader or self.sliced_loader(output_dim, input_dim)

    def add_bias(self, output_size: int, bias: bool) -> None:
        """The bias (in the model's dtype, whatever the weights' method), or None."""
        if bias:
            self.add_parameter("bias", torch.empty(output_size), output_dim=0)
        else:
            self.register_parameter("bias", None)

    def load_weight(self, name: str, loaded: CheckpointTensor, shard_id=None) -> None:
        """Copy this rank's part of the checkpoint tensor ``loaded`` (shard ``shard_id``)
        into parameter ``name``; ValueError when its shape is not the expected one."""
        self.weight_loaders[name](getattr(self, name), loaded, shard_id)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_method.apply(self, x)

    def output_part(self, shard_id) -> tuple[int, int, int, int]:
        """Along the outputs, for checkpoint shard ``shard_id``: (offset in this rank's
        parameter, start in the checkpoint tensor, length, the checkpoint tensor's size)."""
        return 0, 0, self.output_size, self.output_size

    def input_part(self) -> tuple[int, int, int]:
        """Along the inputs: (start in the checkpoint tensor, length, its size)."""
        return 0, self.input_size, self.input_size

    def set_quant_method(self, quant_method: LinearMethod) -> None:
        """Replace the method and its parameters (before the weights are allocated: the
        model is still on the meta device), keeping the bias where there was one."""
        bias = self.bias is not None
        for name in list(self.weight_loaders) + list(self.keep_dtype):
            delattr(self, name)
        self.weight_loaders, self.keep_dtype = {}, set()
        self.quant_method = quant_method
        quant_method.create_weights(self, self.input_size, self.output_size, bias)

    def checkpoint_part(self, param_shape: tuple[int, ...], loaded: CheckpointTensor, shard_id,
                        output_dim: int | None, input_dim: int | None
                        ) -> tuple[torch.Tensor, tuple[int, int] | None]:
        """This rank's part of ``loaded`` for a parameter of ``param_shape`` whose
        ``output_dim`` / ``input_dim`` follow the layer's outputs / inputs, and where it
        goes along ``output_dim`` (offset, length; None: the whole parameter)."""
        expected, parts, rows = list(param_shape), {}, None
        if output_dim is not None:
            offset, start, length, size = self.output_part(shard_id)
            expected[output_dim], parts[output_dim], rows = size, (start, length), (offset, length)
        if input_dim is not None:
            start, length, size = self.input_part()
            expected[input_dim], parts[input_dim] = size, (start, length)
        check_shape(loaded, tuple(expected))
        return take(loaded, parts), rows

    def sliced_loader(self, output_dim: int | None, input_dim: int | None) -> WeightLoader:
        def load(param: nn.Parameter, loaded: CheckpointTensor, shard_id) -> None:
            part, rows = self.checkpoint_part(param.shape, loaded, shard_id, output_dim, input_dim)
            target = param.data if rows is None else param.data.narrow(output_dim, *rows)
            target.copy_(part)
        return load


class ColumnParallelLinear(LinearBase):
    """This rank's even part of the outputs."""

    def __init__(self, input_size: int, output_size: int, shard: Shard = Shard(),
                 bias: bool = False, quant_method: LinearMethod | None = None) -> None:
        self.full_output_size = output_size
        super().__init__(input_size, output_size // shard.size, shard, bias, quant_method)

    def output_part(self, shard_id) -> tuple[int, int, int, int]:
        start, length = self.shard.split(self.full_output_size)
        return 0, start, length, self.full_output_size


class MergedColumnParallelLinear(LinearBase):
    """Several column-parallel projections of one input in one product (gate and up):
    this rank's part of each, side by side; checkpoint shard ``i`` is ``output_sizes[i]``."""

    def __init__(self, input_size: int, output_sizes: list[int], shard: Shard = Shard(),
                 bias: bool = False, quant_method: LinearMethod | None = None) -> None:
        self.output_sizes = list(output_sizes)
        self.shard_ids = tuple(range(len(output_sizes)))
        super().__init__(input_size, sum(output_sizes) // shard.size, shard, bias, quant_method)

    def output_part(self, shard_id: int) -> tuple[int, int, int, int]:
        size = self.output_sizes[shard_id]
        offset = sum(self.output_sizes[:shard_id]) // self.shard.size
        start, length = self.shard.split(size)
        return offset, start, length, size


class QKVParallelLinear(LinearBase):
    """Q, K and V in one product: this rank's query heads, then its KV heads' K and V
    (split when there are enough KV heads, else the one its query heads read)."""

    shard_ids = ("q", "k", "v")

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int,
                 shard: Shard = Shard(), bias: bool = False,
                 quant_method: LinearMethod | None = None) -> None:
        self.head_dim, self.total_num_heads, self.total_num_kv_heads = head_dim, num_heads, num_kv_heads
        self.num_heads = num_heads // shard.size
        self.num_kv_heads = kv_heads_per_rank(num_kv_heads, shard.size)
        self.q_size, self.kv_size = self.num_heads * head_dim, self.num_kv_heads * head_dim
        super().__init__(hidden_size, self.q_size + 2 * self.kv_size, shard, bias, quant_method)

    def output_part(self, shard_id: str) -> tuple[int, int, int, int]:
        if shard_id == "q":
            return 0, self.shard.rank * self.q_size, self.q_size, self.total_num_heads * self.head_dim
        first_head = first_kv_head(self.total_num_kv_heads, self.shard)
        offset = self.q_size if shard_id == "k" else self.q_size + self.kv_size
        return offset, first_head * self.head_dim, self.kv_size, self.total_num_kv_heads * self.head_dim


class RowParallelLinear(LinearBase):
    """This rank's even part of the inputs; returns this rank's partial sum, for the
    ``RMSNorm`` that follows (with the residual) to sum over the ranks. With the fused
    peer all-reduce the partial is written straight into the peer-read buffer
    ``reduce_slot`` (and, from the GEMV, sent to the peers as packets), which that norm
    then reduces. Consecutive row-parallel layers must use different slots, as a peer
    may still read the previous one (``ReduceSlot``). ``reduce_slot=None``: never the
    fused path, for a partial that the model sums itself (``shard.all_reduce``)."""

    def __init__(self, input_size: int, output_size: int, shard: Shard = Shard(),
                 reduce_slot: int | None = None, quant_method: LinearMethod | None = None) -> None:
        self.full_input_size = input_size
        self.reduce_slot = None if reduce_slot is None else int(reduce_slot)
        super().__init__(input_size // shard.size, output_size, shard, False, quant_method)

    def input_part(self) -> tuple[int, int, int]:
        return *self.shard.split(self.full_input_size), self.full_input_size

    def forward(self, x: torch.Tensor, act: nn.Module | None = None) -> torch.Tensor:
        """``act``: ``x`` is the activation's input (an MLP's ``[gate | up]``). One the
        decode GEMV can apply (``SiluAndMul``: ``fuses_into_gemv``) is applied as the
        GEMV loads ``x`` where it takes the step, so its own kernel does not run."""
        silu_mul = (isinstance(act, SiluAndMul) and act.fuses_into_gemv
                    and self.quant_method.uses_gemv(self, x))
        if act is not None and not silu_mul:
            x = act(x)
        fast, slot = self.shard.peer_reduce, self.reduce_slot
        if fast is None or slot is None:
            return self.quant_method.apply(self, x, silu_mul=silu_mul)
        return self.quant_method.apply(self, x, out=fast.output(x.shape[0], slot),
                                       send=fast.send(x.shape[0], slot), silu_mul=silu_mul)
