"""CUDA graphs for decode steps: one graph per (batch size of a ladder, query length).

A decode step launches hundreds of small kernels; replaying a captured graph
removes their launch cost. Each graph reads fixed input buffers, so a batch is
padded up to the next captured size: padded rows have ``seq_len`` 0 and slot
-1, which the Triton kernels skip. A graph serves steps whose sequences all
compute the same number of query rows: one (plain decode), and with speculative
decoding also 2..k + 1 (every sequence verifying as many drafts; its attention is
the prefill kernel's, which needs no host data either). A step of another shape
(mixed draft lengths, prompt chunks) runs eagerly.

On one GPU the graph also holds the LM head and the greedy argmax of every row,
so a greedy step whose rows all sample launches no kernel of its own after the
replay but the copy of its tokens to the host. Under tensor parallelism the logits
are gathered eagerly, as in every other step.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from orbitllm.layers.attention import AttentionMetadata
from orbitllm.layers.fused import argmax


@dataclass
class ForwardOutput:
    """A forward pass's hidden states; from a decode graph on one GPU also every row's
    logits and their argmax (else None)."""

    hidden: torch.Tensor
    logits: torch.Tensor | None = None
    greedy_ids: torch.Tensor | None = None

    def rows(self, n: int) -> "ForwardOutput":
        cut = lambda t: None if t is None else t[:n]
        return ForwardOutput(self.hidden[:n], cut(self.logits), cut(self.greedy_ids))


def batch_size_ladder(max_bs: int) -> list[int]:
    sizes = [b for b in (1, 2, 4, 8) if b < max_bs] + list(range(16, max_bs, 16))
    return sorted(set(sizes + [max_bs]))


class DecodeGraphs:
    def __init__(self, model, backend, kv_cache: torch.Tensor, max_bs: int, max_blocks: int,
                 max_seq_len: int, query_lens: tuple[int, ...] = (1,)) -> None:
        self.model, self.backend, self.kv_cache = model, backend, kv_cache
        self.max_seq_len = max_seq_len
        self.with_logits = model.shard.size == 1
        device = kv_cache.device
        self.sizes = batch_size_ladder(max_bs)
        self.query_lens = query_lens
        rows = max_bs * max(query_lens)
        self.input_ids = torch.zeros(rows, dtype=torch.int64, device=device)
        self.positions = torch.zeros(rows, dtype=torch.int64, device=device)
        self.slots = torch.full((rows,), -1, dtype=torch.int64, device=device)
        self.seq_lens = torch.zeros(max_bs, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros((max_bs, max_blocks), dtype=torch.int32, device=device)
        # Sequence i's rows start at i * q: one query_start_loc per query length.
        self.query_start_loc = {q: torch.arange(0, (max_bs + 1) * q, q, dtype=torch.int32,
                                                device=device) for q in query_lens}
        self.outputs: dict[tuple[int, int], ForwardOutput] = {}
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}   # (batch size, query len)

    def _meta(self, bs: int, q: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slots[:bs * q], query_start_loc=self.query_start_loc[q][:bs + 1],
            seq_lens=self.seq_lens[:bs], block_tables=self.block_tables[:bs],
            max_query_len=q, max_seq_len=self.max_seq_len)

    def _forward(self, bs: int, q: int) -> ForwardOutput:
        rows = bs * q
        hidden = self.model(self.input_ids[:rows], self.positions[:rows], self.kv_cache,
                            self._meta(bs, q), self.backend)
        if not self.with_logits:
            return ForwardOutput(hidden)
        logits = self.model.compute_logits(hidden)
        return ForwardOutput(hidden, logits, argmax(logits))

    @torch.inference_mode()
    def capture(self) -> None:
        """Largest first, so smaller graphs reuse the largest one's memory pool."""
        pool = None
        for key in sorted(((bs, q) for q in self.query_lens for bs in self.sizes),
                          key=lambda k: k[0] * k[1], reverse=True):
            self._forward(*key)          # warm-up: compile kernels outside the capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[key] = self._forward(*key)
            pool = graph.pool()
            self.graphs[key] = graph
        torch.cuda.synchronize()

    def release(self) -> None:
        """Free the graphs. Graphs that captured NCCL collectives must go before the
        process group does: ``destroy_process_group`` hangs while they live
        (pytorch/pytorch#115388)."""
        torch.cuda.synchronize()
        for graph in self.graphs.values():
            graph.reset()
        self.graphs.clear()
        self.outputs.clear()

    def padded_size(self, n: int) -> int | None:
        return next((s for s in self.sizes if s >= n), None)

    def fits(self, num_seqs: int, query_len: int) -> bool:
        """Whether a step of ``num_seqs`` sequences of ``query_len`` rows each has a graph."""
        return query_len in self.query_lens and self.padded_size(num_seqs) is not None

    def run(self, n: int, q: int, input_ids, positions, slots, seq_lens,
            block_tables) -> ForwardOutput:
        """Copy ``n`` sequences of ``q`` rows each into the buffers, replay, return
        their rows' outputs."""
        bs = self.padded_size(n)
        rows = n * q
        self.input_ids[:rows].copy_(input_ids, non_blocking=True)
        self.positions[:rows].copy_(positions, non_blocking=True)
        self.slots[:rows].copy_(slots, non_blocking=True)
        self.seq_lens[:n].copy_(seq_lens, non_blocking=True)
        self.block_tables[:n, :block_tables.shape[1]].copy_(block_tables, non_blocking=True)
        if bs > n:
            self.slots[rows:bs * q].fill_(-1)
            self.seq_lens[n:bs].fill_(0)
        self.graphs[(bs, q)].replay()
        return self.outputs[(bs, q)].rows(rows)
