"""The all-reduce + residual add + RMSNorm of a decode step on N GPUs, three ways:
NCCL all-reduce then the fused RMSNorm kernel; the pull kernel the engine uses
(``peer_reduce_add_norm``: flags, then loads from the peers' memory); the push kernel
(``push_reduce_add_norm``: stores into the peers' inboxes, epoch-tagged words).

Each is timed in a CUDA graph of 64 back-to-back calls (attention / MLP slots
alternating, as in a model step); µs per call, from rank 0.

    python benchmarks/peer_reduce_bench.py [--world 2] [--hidden 4096] [--rows 1 4 16]
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

CALLS = 64


def timed(fn, reps: int = 20) -> float:
    """µs per call of ``fn(i)`` for i < CALLS, captured in one graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for i in range(4):
            fn(i)
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    dist.barrier()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(CALLS):
            fn(i)
    torch.cuda.synchronize()
    dist.barrier()
    graph.replay()
    torch.cuda.synchronize()
    dist.barrier()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    dist.barrier()
    graph.reset()
    return start.elapsed_time(end) * 1e3 / (reps * CALLS)


def worker(rank: int, world: int, port: int, hidden: int, row_counts: list[int]) -> None:
    import torch.distributed._symmetric_memory as symm_mem

    from orbitllm.kernels.fused_ops import rms_norm
    from orbitllm.kernels.peer_reduce import push_reduce_add_norm
    from orbitllm.layers.tensor_parallel import PeerAllReduce

    dev = torch.device("cuda", rank)
    torch.cuda.set_device(dev)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, device_id=dev)
    max_rows = max(row_counts)
    dtype, eps = torch.bfloat16, 1e-6
    pull = PeerAllReduce(max_rows, hidden, dtype, dev)
    stride = max_rows * hidden
    inbox = symm_mem.empty(2 * world * stride, dtype=torch.int64, device=dev)
    handle = symm_mem.rendezvous(inbox, dist.group.WORLD.group_name)
    inbox.zero_()
    epochs = torch.zeros(max_rows, dtype=torch.int32, device=dev)
    abort = torch.zeros(1, dtype=torch.int32, device=dev)
    torch.cuda.synchronize()
    dist.barrier()
    weight = torch.randn(hidden, device=dev, dtype=dtype)
    for rows in row_counts:
        residual = torch.randn(rows, hidden, device=dev, dtype=dtype)
        partial = torch.randn(rows, hidden, device=dev, dtype=dtype)
        for slot in (0, 1):
            pull.output(rows, slot).copy_(partial)
        nccl_buf = partial.clone()

        def nccl(i: int) -> None:
            dist.all_reduce(nccl_buf)
            rms_norm(nccl_buf, weight, eps, residual=residual)

        def pulled(i: int) -> None:
            pull.reduce_add_norm(rows, i % 2, residual, weight, eps)

        def pushed(i: int) -> None:
            push_reduce_add_norm(partial, handle.buffer_ptrs_dev, epochs, abort, rank, world,
                                 (i % 2) * world * stride, stride, residual, weight, eps)

        # The pull and push kernels must agree (same sum order). Each kernel's calls
        # must alternate slots, as in a model step: two calls each, ending on slot 1.
        a = [pull.reduce_add_norm(rows, slot, residual, weight, eps)[0] for slot in (0, 1)]
        b = [push_reduce_add_norm(partial, handle.buffer_ptrs_dev, epochs, abort, rank, world,
                                  slot * world * stride, stride, residual, weight, eps)[0]
             for slot in (0, 1)]
        same = torch.equal(a[1], b[1])
        times = {name: timed(fn) for name, fn in
                 (("nccl+rmsnorm", nccl), ("pull", pulled), ("push", pushed))}
        if rank == 0:
            print(f"world {world} hidden {hidden} rows {rows:3d}: " +
                  "  ".join(f"{k} {v:6.2f} us" for k, v in times.items()) +
                  f"  (pull == push: {same})", flush=True)
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16])
    args = p.parse_args()
    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(args.world, port, args.hidden, args.rows), nprocs=args.world)


if __name__ == "__main__":
    main()
