"""What the engine hands the executor each step, as plain data.

The engine's ``Request`` objects stay on the engine side: a step is described by
request ids, positions, token ids and block ids, so the executor (the one layer
below that reads this module) needs nothing else from the engine. This module
imports no other part of ``orbitllm.engine``.

Nothing here assumes one new token per sequence: a sequence computes
``num_new_tokens`` positions and samples at its last ``num_sampled`` of them (one
today; a speculative verify step samples several).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from orbitllm.sampling_params import SamplingParams


@dataclass(slots=True)
class ScheduledRequest:
    """One sequence's part of a step: what to compute, and how to sample it.

    ``token_ids`` holds the step's input tokens the host knows, in order from
    position ``num_computed_tokens``; the remaining ``num_pending_inputs`` (the
    last positions) were sampled by the step still in flight and are read from
    its device tensor (overlapped scheduling).
    """

    request_id: str
    num_computed_tokens: int          # the step's first position (KV before it is cached)
    num_new_tokens: int               # positions computed this step
    token_ids: list[int]              # the host-known input tokens (only this step's, not the history)
    block_ids: list[int]              # the block table (the KV manager's live list: read, do not keep)
    params: SamplingParams
    num_sampled: int = 0              # trailing positions sampled (0: a prompt chunk short of the end)
    seed: int | None = None           # the request's own seed (None: drawn from the engine's)
    num_output_tokens: int = 0        # tokens generated before this step's first sampled one
    num_prompt_tokens: int = 0
    history: list[int] | None = None  # prompt + output ids, only when penalties read them
    prompt_logprob_targets: list[int] | None = None   # the prompt tokens this step's positions predict
    token_bitmask: object | None = None   # the grammar's allowed next tokens (packed int32), if constrained
    # Speculative verify: the proposed tokens, the last len(draft_token_ids) inputs
    # (the step samples num_sampled = 1 + that many rows).
    draft_token_ids: list[int] | None = None

    @property
    def num_pending_inputs(self) -> int:
        return self.num_new_tokens - len(self.token_ids)


@dataclass
class SchedulerOutput:
    """One step: the sequences to compute, in batch order."""

    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[str] = field(default_factory=list)   # request ids preempted this step
    # Indexes into ``scheduled`` of pooling (embedding) sequences: the runner returns the
    # sum and the last of their final hidden states instead of sampling them.
    pooling: list[int] = field(default_factory=list)
    num_constrained: int = 0   # sequences with a token_bitmask (0: no row reads one)
    # Overlapped scheduling with constrained sequences: their masks depend on the step
    # in flight, so the runner calls this once it has queued this step's forward, and
    # gets request id -> bitmask (the engine reads the step in flight back meanwhile).
    late_bitmasks: Callable[[], dict] | None = None
    drafts: dict[str, list[int]] = field(default_factory=dict)   # request id -> its verified drafts

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class RequestFault(RuntimeError):
    """A step failed for reasons tied to these requests (their sampling rows, their
    prompt logprobs): the engine fails them and the rest of the step runs again."""

    def __init__(self, request_ids: list[str], cause: BaseException) -> None:
        super().__init__(f"requests {request_ids[:4]} failed: {type(cause).__name__}: {cause}")
        self.request_ids = request_ids
        self.cause = cause


class FatalStepError(RuntimeError):
    """The executor cannot go on (a tensor-parallel worker died, the device is lost):
    no request is to blame and no retry can help, so the engine re-raises it."""
