"""Programmatic dependent launch (PDL, Hopper and later): a kernel's programs start
while the kernel before it on the stream is still finishing.

A one-request decode step is a chain of ~350 short kernels. Between two of them the
GPU drains one grid before it starts the next, and under tensor parallelism the
all-reduce kernel runs on one SM per row while the other SMs idle for its NVLink
round trip (~6 µs, 64 times a step on Llama-8B). With PDL the next kernel's programs
become resident while the current one runs; they block in ``gdc_wait`` until the
kernel before has completed and its writes are visible, so the launch and the start
of their programs overlap the end of the kernel before. The GEMV also loads its
first chunk of weights before it waits, the KV write its cos/sin, the decode attention
its first tile of cached keys and values.

Every kernel launched with PDL here follows three rules:
- all reads of earlier kernels' outputs and all writes come after ``gdc_wait``.
  Before it a kernel reads only what no kernel of the chain writes: weights, the
  step's inputs (positions, slots, lengths, block tables: copied in before the
  chain's first kernel, which is not launched early), and the KV cache of earlier
  steps (a decode step writes only each sequence's newest position);
- every program calls it, before any early return, so a kernel completes only
  after the kernel before it, and completion stays transitive along the chain;
- ``gdc_launch_dependents`` comes right after the wait, so at most one kernel runs
  ahead and its waiting programs never hold SMs that the running kernel still needs.

``ORBITLLM_PDL=0`` switches it off (an A/B switch for benchmarks, see ``orbitllm/envs.py``).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from orbitllm.envs import envs


@functools.cache
def _pdl_on(device_index: int) -> bool:
    if not envs().pdl or envs().triton_interpret:
        return False
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def pdl_args(t: torch.Tensor) -> dict:
    """A kernel's launch arguments for PDL on ``t``'s device (on with CUDA, compute
    capability >= 9): the ``PDL`` constexpr that ``pdl_enter`` takes and the launch
    option, always alike (a kernel launched early that does not wait would race)."""
    on = t.is_cuda and _pdl_on(t.device.index if t.device.index is not None else 0)
    return {"PDL": on, "launch_pdl": on}


@triton.jit
def pdl_enter(PDL: tl.constexpr):
    """Wait for the kernel before (its writes are visible after this), then let the
    next kernel launch. A no-op without PDL (and in the interpreter, which lacks it)."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()

