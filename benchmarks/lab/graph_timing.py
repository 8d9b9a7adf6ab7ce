"""Timing of a microbenchmark's calls inside one CUDA graph, shared by the kernel
benchmarks: back-to-back calls in a graph see the launch gaps of a model step's
graph, not Python's."""
from __future__ import annotations

from typing import Callable

import torch


def us_per_call(fn: Callable[[int], object], calls: int, reps: int,
                sync: Callable[[], None] = lambda: None) -> float:
    """Microseconds per call of ``fn(i)`` for ``i < calls``, captured back to back in
    one graph and replayed ``reps`` times. ``sync`` runs between the phases (a barrier
    when several ranks time a collective together)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for i in range(calls):   # compile / warm up outside the capture
            fn(i)
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    sync()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(i)
    torch.cuda.synchronize()
    sync()
    us = replay_ms(graph, reps, sync) * 1e3 / calls
    graph.reset()
    return us


def replay_ms(graph: torch.cuda.CUDAGraph, reps: int,
              sync: Callable[[], None] = lambda: None) -> float:
    """Milliseconds per replay of a captured ``graph``: one replay, then ``reps`` back
    to back, timed on the device."""
    graph.replay()
    torch.cuda.synchronize()
    sync()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    sync()
    return start.elapsed_time(end) / reps
