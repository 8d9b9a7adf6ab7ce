"""What the parts of a one-request decode step cost, on one GPU or on ``--tp N`` GPUs:
the decode graph (the forward without LM head and sampling) replayed back to back as
is, then re-captured with one part changed at a time: without the attention (the
rotary + KV write and the decode kernels; timing only, the outputs are wrong), with
the KV write alone or the decode kernels alone, with other decode tile configs,
without communication (each rank's partial taken as the sum: timing only), with a
fixed number of KV splits, with PDL off. Then the parts outside the graph: the LM
head (with the logit gather under TP) and the argmax.

``--shard-of N`` runs one process as rank 0 of an N-way split with every collective
taken out: a tensor-parallel rank's shapes and kernels, timed on one GPU (the step of
``--tp N``'s "without communication" variant).

Each rank builds its shard directly (no engine, no scheduler), so every rank can
re-capture its graph; under TP the ranks replay in lockstep (their all-reduces meet).

    python benchmarks/lab/step_parts.py [--model llama3.1-8b] [--context 768] [--tp 2 | --shard-of 2]
"""
from __future__ import annotations

import argparse
import contextlib
import functools
from dataclasses import replace
from unittest.mock import patch

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from graph_timing import replay_ms, us_per_call

import orbitllm.kernels.paged_attention as pa
import orbitllm.kernels.pdl as pdl
import orbitllm.layers.triton_attention as ta
from orbitllm.kernels.kv_write import rotary_store_kv_cache
from orbitllm.kernels.paged_attention import paged_decode_attention
from orbitllm.config import EngineConfig
from orbitllm.executor.setup import build_rank_runner, resolve_tp_all_reduce
from orbitllm.executor.tensor_parallel import _free_port, close_process_group, init_distributed
from orbitllm.kernels.fused_ops import argmax
from orbitllm.layers.linear import linear
from orbitllm.layers.tensor_parallel import Shard


def no_attention(self, q, k, v, k_cache, v_cache, meta, scale, sliding_window, rope=None):
    return q


def kv_write_only(self, q, k, v, k_cache, v_cache, meta, scale, sliding_window, rope=None):
    rotary_store_kv_cache(q, k, v, k_cache, v_cache, meta.slot_mapping, *rope)
    return q


def no_kv_write(self, q, k, v, k_cache, v_cache, meta, scale, sliding_window, rope=None):
    return paged_decode_attention(q, k_cache, v_cache, meta.query_start_loc, meta.seq_lens,
                                  meta.block_tables, meta.max_seq_len, scale, sliding_window)


def decode_config(*fields):
    return patch.object(pa, "default_decode_config", lambda *a: pa.DecodeConfig(*fields))


def no_communication():
    """Every rank takes its own partial as the sum (the shapes and kernels of the
    fused path's NCCL fallback, minus the collective)."""
    stack = contextlib.ExitStack()
    stack.enter_context(patch.object(Shard, "all_reduce", lambda self, x: x))
    stack.enter_context(patch.object(Shard, "row_parallel",
                                lambda self, x, w, slot, silu_mul=False: linear(x, w, silu_mul=silu_mul)))
    stack.enter_context(patch.object(Shard, "reduce_norm",
                                lambda self, partial, residual, norm, slot: norm(partial, residual)))
    return stack


def lone_shard():
    """One rank of a split with no peers: every collective returns this rank's part."""
    stack = no_communication()
    stack.enter_context(patch.object(Shard, "gather_last_dim", lambda self, x: x))
    stack.enter_context(patch.object(Shard, "broadcast", lambda self, x: x))
    stack.enter_context(patch.object(Shard, "min_over_ranks", lambda self, value, device: value))
    return stack


def rank_main(rank: int, size: int, init_method: str, args) -> None:
    lone = args.shard_of > 1
    shard = Shard(0, args.shard_of) if lone else Shard(rank, size)
    cfg = EngineConfig(model=args.model, load_format="dummy", max_model_len=2048, max_num_seqs=1,
                       tensor_parallel_size=shard.size)
    # Resolved as the driver does, from the first GPU (every rank must agree); a lone
    # rank has no peers to map.
    cfg = replace(cfg, tp_all_reduce="nccl" if lone else
                  resolve_tp_all_reduce(cfg, torch.device("cuda", 0)))
    with lone_shard() if lone else contextlib.nullcontext():
        measure(shard, cfg, init_method, args)


def measure(shard: Shard, cfg: EngineConfig, init_method: str, args) -> None:
    rank, size = shard.rank, shard.size
    device = torch.device("cuda", rank)
    lone = args.shard_of > 1
    if size > 1 and not lone:
        init_distributed(shard, init_method, device)
    torch.cuda.set_device(device)
    runner = build_rank_runner(cfg, shard, device)
    sync = dist.barrier if size > 1 and not lone else (lambda: None)
    graphs = runner.graphs
    graphs.with_logits = False   # the forward alone, as under TP; the LM head is timed last
    ctx = args.context   # one request whose newest token sits at position ctx - 1
    graphs.input_ids[0] = 100
    graphs.positions[0] = ctx - 1
    graphs.slots[0] = ctx - 1
    graphs.seq_lens[0] = ctx
    graphs.block_tables[0] = torch.arange(graphs.block_tables.shape[1], device=device)

    def recaptured_ms() -> float:
        sync()
        graphs.release()
        graphs.capture()
        sync()
        return replay_ms(graphs.graphs[(1, 1)], args.reps, sync)

    def say(line: str) -> None:   # as it comes, so that a hang still leaves the lines before
        if rank == 0:
            print(line, flush=True)

    base = recaptured_ms()
    setting = f"rank 0 of {size}, no communication" if lone else f"tp={size} ({cfg.tp_all_reduce})"
    say(f"{args.model}, {setting}, context {ctx}: decode graph {base:.3f} ms")
    attention = functools.partial(patch.object, ta.TritonAttentionBackend, "forward")
    variants = {"without attention": attention(no_attention),
                "KV write only": attention(kv_write_only),
                "attention, no KV write": attention(no_kv_write),
                "PDL off": patch.object(pdl, "_pdl_on", lambda i: False)}
    if size > 1 and not lone:
        variants["without communication"] = no_communication()
    for splits in (8, 32):
        variants[f"{splits} KV splits"] = patch.object(pa, "choose_num_splits", lambda *a, s=splits, **k: s)
    for fields in ((64, 4, 1), (64, 2, 1), (32, 4, 1), (64, 4, 3, 1), (64, 4, 1, 1)):
        variants[f"decode config {fields}"] = decode_config(*fields)
    for name, change in variants.items():
        with change:
            ms = recaptured_ms()
        say(f"  {name:24} {ms:.3f} ms ({ms - base:+.3f})")
    say(f"  as is, again             {recaptured_ms():.3f} ms")
    hidden = graphs.outputs[1].hidden
    model = runner.model
    say(f"  LM head{' + gather' if size > 1 and not lone else ''}: "
        f"{us_per_call(lambda i: model.compute_logits(hidden), 8, 20, sync):.1f} us")
    logits = model.compute_logits(hidden)   # a collective under TP: every rank calls it
    if rank == 0:
        logits = logits.float()
        say(f"  argmax: {us_per_call(lambda i: argmax(logits), 8, 20):.1f} us")
    sync()
    runner.shutdown()
    if size > 1 and not lone:
        close_process_group()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="llama3.1-8b")
    p.add_argument("--context", type=int, default=768)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--shard-of", type=int, default=1)
    p.add_argument("--reps", type=int, default=100)
    args = p.parse_args()
    if args.tp == 1:
        rank_main(0, 1, "", args)
        return
    mp.spawn(rank_main, args=(args.tp, f"tcp://127.0.0.1:{_free_port()}", args), nprocs=args.tp)


if __name__ == "__main__":
    main()
