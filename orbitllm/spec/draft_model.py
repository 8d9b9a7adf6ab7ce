"""Draft-model proposals: a smaller model with the target's vocabulary guesses the
next k tokens, greedily.

Exact for free: a greedy draft is a point-mass proposer (``q = δ_d``), so the
verification of ``spec/rejection.py`` (draw every verify row from the target, keep
the drafts while the draws equal them) keeps the target's distribution exactly,
with temperature, filters, penalties, seeds and logprobs unchanged. Whatever the
draft computes, right or wrong (stale draft KV included), can only lower acceptance.
The price: a sampled row accepts the draft with the target's probability of the
draft's argmax, not ``sum(min(p, q))`` as drafts sampled from the draft's own
distribution would.

The draft's KV: a cache tensor of its own with the target pool's number of blocks
and block size, indexed by the target's block tables. A block the KV manager hands
a request holds both models' KV of its positions, so the pool's accounting covers
the draft too (``executor/setup.py`` counts both models' bytes per block when it
sizes the pool).

Lazy catch-up instead of lock-step: a request's draft KV is valid for its first
``draft_computed`` positions. A proposal round runs the draft once over every
request's tokens from there to its last one (one varlen prefill-style forward:
prompts, and the tokens accepted or corrected since the last round; a long one in
chunks over several rounds), takes the argmax at each last row (d1), then k - 1
one-token decode forwards from d1. Before the round the engine reserves the verify
step's slots (the last token and k drafts), which hold the draft's KV of positions
n .. n + k - 1 too. After the verify step
``draft_computed`` keeps the positions whose inputs turned out to be the emitted
tokens; a preempted request (blocks freed) starts again from 0.

Tensor parallelism: the draft runs whole (unsharded, no collectives) on the driver
process only; the workers never see it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from orbitllm.executor.cuda_graph import DecodeGraphs
from orbitllm.executor.model_runner import compile_prefill_path
from orbitllm.layers.attention import AttentionBackend, AttentionMetadata
from orbitllm.models.interface import CausalLM


@dataclass
class DraftSeq:
    """One request's part of a proposal round (plain data: ``spec`` does not import
    the engine)."""

    tokens: list[int]      # prompt + output; the last one (position n) was just sampled
    start: int             # its first position without valid draft KV (<= n)
    k: int                 # drafts to propose (positions n + k - 1 < max_model_len);
    #                        0: only catch up (``tokens`` a prefix: one chunk of a long one)
    block_ids: list[int]   # its block table, covering positions up to n + k - 1


class DraftModelProposer:
    """The draft model, its KV cache and its decode graphs; ``propose`` runs a round."""

    def __init__(self, model: CausalLM, backend: AttentionBackend, device: torch.device,
                 num_blocks: int, block_size: int, kv_dtype: torch.dtype, max_num_seqs: int,
                 max_model_len: int, use_graphs: bool) -> None:
        """``max_model_len``: the target's; the draft proposes only below its own
        ``max_position_embeddings`` too. ``use_graphs``: capture the one-token decode
        passes in CUDA graphs (the draft's own ``DecodeGraphs`` over its own cache)."""
        self.model, self.backend, self.device, self.block_size = model, backend, device, block_size
        spec = model.spec
        self.kv_cache = torch.zeros(spec.num_layers, 2, num_blocks, block_size, model.num_kv_heads,
                                    spec.head_dim, dtype=kv_dtype, device=self.device)
        self.max_model_len = min(max_model_len, spec.max_position_embeddings)
        if device.type == "cuda":
            compile_prefill_path(model, backend, self.kv_cache, min(2 * block_size, self.max_model_len))
        self.graphs: DecodeGraphs | None = None
        if use_graphs:
            self.graphs = DecodeGraphs(model, backend, self.kv_cache, max_num_seqs,
                                       -(-max_model_len // block_size), max_model_len)
            self.graphs.capture()

    def room(self, num_tokens: int) -> int:
        """The most drafts for a request of ``num_tokens`` tokens: its drafts' inputs
        (positions up to num_tokens + k - 2) stay within the draft's positions."""
        return self.max_model_len - num_tokens + 1

    @torch.inference_mode()
    def propose(self, seqs: list[DraftSeq]) -> list[list[int]]:
        """Each sequence's ``k`` greedy drafts, for the batch at once (one host sync).
        Sequences run in descending ``k`` so that the ones still drafting in decode pass
        j are always the first ``m_j``: a pass's inputs are a prefix of the previous
        pass's argmax, on the device, and nobody writes KV past its reserved slots."""
        if not seqs:
            return []
        order = sorted(range(len(seqs)), key=lambda i: -seqs[i].k)
        ss = [seqs[i] for i in order]
        B, bs = len(ss), self.block_size
        starts = np.array([s.start for s in ss], np.int64)
        ends = np.array([len(s.tokens) for s in ss], np.int64)   # n + 1
        ks = np.array([s.k for s in ss], np.int64)
        table = np.zeros((B, max(len(s.block_ids) for s in ss)), np.int32)
        for i, s in enumerate(ss):
            table[i, :len(s.block_ids)] = s.block_ids

        # The catch-up pass: every sequence's positions start .. n.
        qlens = ends - starts
        qsl = np.zeros(B + 1, np.int64)
        np.cumsum(qlens, out=qsl[1:])
        T = int(qsl[-1])
        tokens = np.fromiter((t for s in ss for t in s.tokens[s.start:]), np.int64, T)
        positions = np.repeat(starts - qsl[:-1], qlens) + np.arange(T)
        rows = np.repeat(np.arange(B), qlens)
        slots = table[rows, positions // bs].astype(np.int64) * bs + positions % bs
        # Decode pass j (1 .. max k - 1): the first m_j sequences, at positions n + j.
        counts = [int((ks > j).sum()) for j in range(1, int(ks[0]))]
        dec_seq = np.concatenate([np.arange(m) for m in counts]) if counts else np.zeros(0, np.int64)
        dec_pos = (np.concatenate([ends[:m] - 1 + j for j, m in enumerate(counts, 1)])
                   if counts else np.zeros(0, np.int64))
        dec_slots = table[dec_seq, dec_pos // bs].astype(np.int64) * bs + dec_pos % bs

        dev = self.device
        i64 = torch.from_numpy(np.concatenate([tokens, positions, slots, dec_pos, dec_slots])).to(dev)
        tokens_d, positions_d, slots_d, dec_pos_d, dec_slots_d = i64.split(
            [T, T, T, len(dec_pos), len(dec_pos)])
        i32 = torch.from_numpy(np.concatenate([qsl, ends, table.ravel()]).astype(np.int32)).to(dev)
        qsl_d, ends_d, table_d = i32.split([B + 1, B, table.size])
        table_d = table_d.view(B, -1)
        dec_lens_d = (dec_pos_d + 1).to(torch.int32)

        meta = AttentionMetadata(
            slot_mapping=slots_d, query_start_loc=qsl_d, seq_lens=ends_d, block_tables=table_d,
            max_query_len=int(qlens.max()), max_seq_len=int(ends.max()),
            query_start_loc_cpu=qsl.tolist(), seq_lens_cpu=ends.tolist())
        hidden = self.model(tokens_d, positions_d, self.kv_cache, meta, self.backend)
        ids = self.model.compute_logits(hidden[qsl_d[1:].long() - 1]).argmax(-1)
        passes = [ids]
        bounds = np.cumsum([0] + counts).tolist()
        for m, a in zip(counts, bounds):
            sl = slice(a, a + m)
            ids = self._decode(ids[:m], dec_pos_d[sl], dec_slots_d[sl], dec_lens_d[sl],
                               table_d[:m], dec_pos[sl])
            passes.append(ids)
        flat = torch.cat(passes).tolist()   # the round's one sync
        per_pass = [flat[:B]] + [flat[B + a:B + a + m] for m, a in zip(counts, bounds)]
        out: list[list[int]] = [[] for _ in seqs]
        for i, j in enumerate(order):   # sorted sequence i is seqs[j]; it drafted in its first k passes
            out[j] = [ids[i] for ids in per_pass[:ss[i].k]]
        return out

    def _decode(self, ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                seq_lens: torch.Tensor, table: torch.Tensor,
                positions_host: np.ndarray) -> torch.Tensor:
        """One query token per sequence: the next drafts (argmax)."""
        m = ids.shape[0]
        if self.graphs is not None and self.graphs.fits(m, 1):
            # The graph's output buffer is its next replay's too: keep a copy.
            return self.graphs.run(m, 1, ids, positions, slots, seq_lens, table).greedy_ids.clone()
        lens = (positions_host + 1).tolist()
        meta = AttentionMetadata(
            slot_mapping=slots, query_start_loc=torch.arange(m + 1, dtype=torch.int32, device=ids.device),
            seq_lens=seq_lens, block_tables=table, max_query_len=1, max_seq_len=max(lens),
            query_start_loc_cpu=list(range(m + 1)), seq_lens_cpu=lens)
        hidden = self.model(ids, positions, self.kv_cache, meta, self.backend)
        return self.model.compute_logits(hidden).argmax(-1)

    def release(self) -> None:
        """Free the CUDA graphs (they hold the draft cache's memory)."""
        if self.graphs is not None:
            self.graphs.release()
            self.graphs = None
