"""One step's inputs to the model, as host arrays: the runner's only input type.

``StepInputs.build`` lays it out from the scheduler's plain step data (for
``ModelRunner.prepare``); a tensor-parallel driver sends the same object to its workers
(``StepChannel`` packs every field marked ``wire``, and the workers rebuild it),
so there is one schema for a step. ``sampling`` stays on the driver.

A sequence may compute several query positions in any step and be sampled at
several of them: sample rows, pending rows and query lengths are all arrays.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from orbitllm.engine.step_data import ScheduledRequest, SchedulerOutput
from orbitllm.layers.sampler import SamplingRows


def _wire(dtype: type) -> Any:
    """A field every rank needs: an array that ``StepChannel`` sends with this dtype."""
    return field(metadata={"wire": dtype})


@dataclass
class PromptLogprobGroup:
    """The driver's part of one request's prompt logprobs in this step."""

    request_id: str
    num_top: int                 # top-N asked
    targets: list[int]           # the prompt token each of its rows predicts


@dataclass
class StepSampling:
    """The driver's alone: what the sampled rows and prompt-logprob rows are for."""

    rows: SamplingRows                       # row i: settings of ``StepInputs.sample_rows[i]``
    prompt_logprobs: list[PromptLogprobGroup]   # group g: rows ``StepInputs.prompt_groups()[g]``


@dataclass
class StepInputs:
    """A step's packed query rows (sequence i owns rows ``query_start_loc[i]`` up to
    ``query_start_loc[i + 1]``) and what to read out of them."""

    input_ids: np.ndarray = _wire(np.int64)        # [T]; 0 where the token is pending on the device
    positions: np.ndarray = _wire(np.int64)        # [T]
    slots: np.ndarray = _wire(np.int64)            # [T] flat KV slot of each row
    query_start_loc: np.ndarray = _wire(np.int32)  # [B + 1]
    seq_lens: np.ndarray = _wire(np.int32)         # [B] length after the step
    block_tables: np.ndarray = _wire(np.int32)     # [B, W] padded with 0
    sample_rows: np.ndarray = _wire(np.int64)      # [S] rows whose logits are sampled
    pending_rows: np.ndarray = _wire(np.int64)     # [P] rows whose token the step in flight samples
    pending_src: np.ndarray = _wire(np.int64)      # [P] their index among its sampled ids
    prompt_rows: np.ndarray = _wire(np.int64)      # [R] rows whose logits prompt logprobs read
    prompt_counts: np.ndarray = _wire(np.int64)    # [G] rows per request, in order
    max_query_len: int = field(default=0, metadata={"wire": int})
    max_seq_len: int = field(default=0, metadata={"wire": int})
    sampling: StepSampling | None = None           # the driver's; None on a worker

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[0]

    @property
    def uniform_query_len(self) -> int | None:
        """The query length when every sequence has the same (1 in a plain decode
        step), else None. Every length is at most the maximum, so they are all equal
        exactly when they sum to num_seqs times it."""
        q = self.max_query_len
        return q if self.num_tokens == self.num_seqs * q else None

    def prompt_groups(self) -> list[list[int]]:
        """``prompt_rows`` split per request (each group's logits are computed apart)."""
        bounds = np.cumsum(self.prompt_counts).tolist()
        rows = self.prompt_rows.tolist()
        return [rows[a:b] for a, b in zip([0] + bounds, bounds)]

    @classmethod
    def build(cls, sched: SchedulerOutput, block_size: int,
              prev_rows: Mapping[str, range] | None = None) -> "StepInputs":
        """Flatten the step into host arrays (vectorized: the per-request work is a
        few attribute reads and one list extend). ``prev_rows``: request id -> its
        rows among the sampled ids of the step in flight, which feed the inputs
        still pending (a request's last inputs are its last sampled tokens)."""
        scheduled = sched.scheduled
        B = len(scheduled)
        starts = np.fromiter((s.num_computed_tokens for s in scheduled), np.int64, B)
        qlens = np.fromiter((s.num_new_tokens for s in scheduled), np.int64, B)
        num_sampled = np.fromiter((s.num_sampled for s in scheduled), np.int64, B)
        ends = starts + qlens
        qsl = np.zeros(B + 1, np.int64)
        np.cumsum(qlens, out=qsl[1:])
        T = int(qsl[-1])
        tokens: list[int] = []
        pending_rows: list[int] = []   # rows whose token is still on the device (sampled by prev)
        pending_src: list[int] = []    # and their index among prev's sampled ids
        prompt_rows: list[int] = []
        groups: list[PromptLogprobGroup] = []
        for s in scheduled:
            if s.prompt_logprob_targets is not None:
                targets = s.prompt_logprob_targets
                prompt_rows += range(len(tokens), len(tokens) + len(targets))
                groups.append(PromptLogprobGroup(s.request_id, s.params.prompt_logprobs, targets))
            tokens += s.token_ids
            missing = s.num_new_tokens - len(s.token_ids)
            if missing:   # the last positions: what prev sampled for this request
                src = prev_rows[s.request_id]
                pending_rows += range(len(tokens), len(tokens) + missing)
                pending_src += src[len(src) - missing:]
                tokens += [0] * missing
        positions = np.repeat(starts - qsl[:-1], qlens) + np.arange(T)
        width = max(len(s.block_ids) for s in scheduled)
        table = np.zeros((B, width), np.int32)
        for i, s in enumerate(scheduled):
            table[i, :len(s.block_ids)] = s.block_ids
        seq_of_row = np.repeat(np.arange(B), qlens)
        slots = (table[seq_of_row, positions // block_size].astype(np.int64) * block_size
                 + positions % block_size)
        # Sequence i samples its last num_sampled[i] rows.
        S = int(num_sampled.sum())
        first_of_seq = np.repeat(np.cumsum(num_sampled) - num_sampled, num_sampled)
        sample_rows = np.repeat(qsl[1:] - num_sampled, num_sampled) + np.arange(S) - first_of_seq
        seq_lens = ends.astype(np.int32)
        return cls(
            input_ids=np.asarray(tokens, dtype=np.int64), positions=positions, slots=slots,
            query_start_loc=qsl.astype(np.int32), seq_lens=seq_lens, block_tables=table,
            sample_rows=sample_rows, pending_rows=np.asarray(pending_rows, np.int64),
            pending_src=np.asarray(pending_src, np.int64),
            prompt_rows=np.asarray(prompt_rows, np.int64),
            prompt_counts=np.asarray([len(g.targets) for g in groups], np.int64),
            max_query_len=int(qlens.max()), max_seq_len=int(seq_lens.max()),
            sampling=StepSampling(_sampling_rows([s for s in scheduled if s.num_sampled], S,
                                                 sched.num_constrained > 0), groups))


def _sampling_rows(sampled: list[ScheduledRequest], num_rows: int,
                   constrained: bool = False) -> SamplingRows:
    """One row per sampled position, in batch order: a sequence's k-th sampled row
    draws its output token ``num_output_tokens + k``. Rows with penalties carry the
    sequence's history as it stood when the step was scheduled."""
    seqs = sampled if len(sampled) == num_rows else [
        s for s in sampled for _ in range(s.num_sampled)]
    index = [s.num_output_tokens for s in seqs] if seqs is sampled else [
        s.num_output_tokens + k for s in sampled for k in range(s.num_sampled)]
    # A verify row k follows drafts 0..k-1: its penalties count them as output.
    histories = [s.history for s in seqs] if seqs is sampled else [
        s.history if s.history is None or not k else s.history + s.draft_token_ids[:k]
        for s in sampled for k in range(s.num_sampled)]
    return SamplingRows(
        request_ids=[s.request_id for s in seqs], params=[s.params for s in seqs],
        seeds=[s.seed for s in seqs], output_index=index,
        histories=histories, num_prompt_tokens=[s.num_prompt_tokens for s in seqs],
        token_bitmasks=[s.token_bitmask for s in seqs] if constrained else None)
