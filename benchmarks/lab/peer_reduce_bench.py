"""The all-reduce + residual add + RMSNorm of a decode step on N GPUs, two ways:
NCCL all-reduce then the fused RMSNorm kernel, and the engine's fused peer kernel
(``PeerAllReduce``: flags, then loads from the peers' memory).

Each is timed in a CUDA graph of 64 back-to-back calls (attention / MLP slots
alternating, as in a model step); µs per call, from rank 0.

    python benchmarks/lab/peer_reduce_bench.py [--world 2] [--hidden 4096] [--rows 1 4 16]
"""
from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from graph_timing import us_per_call

CALLS = 64


def worker(rank: int, world: int, port: int, hidden: int, row_counts: list[int]) -> None:
    from orbitllm.kernels.fused_ops import rms_norm
    from orbitllm.layers.tensor_parallel import PeerAllReduce

    dev = torch.device("cuda", rank)
    torch.cuda.set_device(dev)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, device_id=dev)
    dtype, eps = torch.bfloat16, 1e-6
    peer = PeerAllReduce(max(row_counts), hidden, dtype, dev)
    weight = torch.randn(hidden, device=dev, dtype=dtype)
    for rows in row_counts:
        residual = torch.randn(rows, hidden, device=dev, dtype=dtype)
        partial = torch.randn(rows, hidden, device=dev, dtype=dtype)
        for slot in (0, 1):
            peer.output(rows, slot).copy_(partial)
        nccl_buf = partial.clone()

        def nccl(i: int) -> None:
            dist.all_reduce(nccl_buf)
            rms_norm(nccl_buf, weight, eps, residual=residual)

        def fused(i: int) -> None:
            peer.reduce_add_norm(rows, i % 2, residual, weight, eps)

        # The two agree to bf16 rounding of the sum (calls alternate slots, as in a step).
        got = [peer.reduce_add_norm(rows, slot, residual, weight, eps)[0] for slot in (0, 1)][1]
        total = partial.clone()
        dist.all_reduce(total)
        want = rms_norm(total, weight, eps, residual=residual.clone())[0]
        diff = (got.float() - want.float()).abs().max().item()
        times = {name: us_per_call(fn, CALLS, reps=20, sync=dist.barrier)
                 for name, fn in (("nccl+rmsnorm", nccl), ("peer", fused))}
        if rank == 0:
            print(f"world {world} hidden {hidden} rows {rows:3d}: " +
                  "  ".join(f"{k} {v:6.2f} us" for k, v in times.items()) +
                  f"  (max |peer - nccl| {diff:.3g})", flush=True)
    peer.close()
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16])
    args = p.parse_args()
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(args.world, port, args.hidden, args.rows), nprocs=args.world)


if __name__ == "__main__":
    main()
