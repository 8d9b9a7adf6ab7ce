"""One step's inputs to the model, as host arrays: the runner's only input type.

``ModelRunner.prepare`` builds a ``StepInputs`` from the scheduler's plain
step data; a tensor-parallel driver sends the same object to its workers
(``StepChannel`` packs every field marked ``wire``, and the workers rebuild it),
so there is one schema for a step. ``sampling`` stays on the driver.

A sequence may compute several query positions in any step and be sampled at
several of them: sample rows, pending rows and query lengths are all arrays.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

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
