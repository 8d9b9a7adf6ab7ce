"""Iteration-level scheduler: who runs this step and with how many tokens.

Each step has a token budget and a sequence cap. Running requests go first
(decodes and unfinished prefill chunks), then waiting requests take what is
left, so a long prompt is chunked instead of stalling the others. When blocks
run out the lowest-priority, most recently started request is preempted: its
blocks are freed and it is recomputed later (prefix caching usually makes the
recompute cheap). The scheduler only moves plain data; it never touches tensors.
"""
from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass, field

from orbitllm.engine.request import Request, RequestStatus
from orbitllm.engine.step_data import SchedulerOutput
from orbitllm.kv.kv_manager import KVCacheManager


@dataclass
class Schedule:
    """One step's decision, engine side: the requests to run in batch order and how
    many tokens each computes. The engine turns it into the plain ``SchedulerOutput``
    the runner reads (``step_data``) right before the launch, after any drain of the
    step in flight, so the tokens it copies are the latest the host has."""

    requests: list[Request] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    block_ids: list[list[int]] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    drafts: dict[str, list[int]] = field(default_factory=dict)   # speculating requests' proposals

    @property
    def is_empty(self) -> bool:
        return not self.requests

    @property
    def needs_host_tokens(self) -> bool:
        return any(r.needs_host_tokens for r in self.requests)

    def step_data(self) -> SchedulerOutput:
        return SchedulerOutput(
            [r.scheduled(n, b) for r, n, b in zip(self.requests, self.num_new_tokens, self.block_ids)],
            [r.request_id for r in self.preempted], drafts=self.drafts)


class Scheduler:
    def __init__(self, kv: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int) -> None:
        self.kv = kv
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: list[tuple[tuple, Request]] = []   # sorted by (priority, arrival, seq)
        self.running: list[Request] = []                 # in the order they were started
        self._counter = itertools.count()
        self.num_preemptions = 0

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, req: Request) -> None:
        req.status = RequestStatus.WAITING
        self._enqueue(req, next(self._counter))

    def _enqueue(self, req: Request, order: int) -> None:
        bisect.insort(self.waiting, ((req.priority, req.arrival_time, order), req),
                      key=lambda item: item[0])

    def remove(self, req: Request, free_blocks: bool = True) -> None:
        """Take a request out of the queues (finished or aborted) and free its blocks
        (``free_blocks=False``: the engine keeps them, for sequences forked from it)."""
        if req in self.running:
            self.running.remove(req)
        else:
            self.waiting = [item for item in self.waiting if item[1] is not req]
        if free_blocks:
            self.kv.free(req)

    def schedule(self, only: str | None = None) -> Schedule:
        """``only``: a step of that one running request and nothing else (the engine
        isolating which request of a failed step fails)."""
        out = Schedule()
        budget = self.max_num_batched_tokens
        granted: dict[str, int] = {}

        for req in list(self.running):
            if budget <= 0:
                break
            if req.status != RequestStatus.RUNNING:   # preempted earlier in this loop
                continue
            if only is not None and req.request_id != only:
                continue
            if req.max_tokens_reached or req.num_tokens >= self.max_model_len:
                continue   # its last token is still in flight; it finishes when that lands
            num_new = min(req.num_tokens - req.num_computed_tokens, budget)
            if num_new <= 0:
                continue
            if req.spec_token_ids:   # lookahead slots for the drafts, as far as the budget goes
                num_new = self._with_drafts(req, num_new, budget)
            while not self.kv.allocate_slots(req, num_new):
                if req.spec_token_ids:   # give up the lookahead before preempting anyone
                    num_new -= len(req.spec_token_ids)
                    req.spec_token_ids = []
                    continue
                victim = self._pick_victim()
                budget += granted.pop(victim.request_id, 0)
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is req:
                    break
            else:
                granted[req.request_id] = num_new
                budget -= num_new

        # Admit waiting requests only when nobody was preempted: memory is tight.
        while (only is None and not out.preempted and self.waiting and budget > 0
               and len(self.running) < self.max_num_seqs):
            req = self.waiting[0][1]
            # A forked sequence arrives with its parent's blocks (num_computed_tokens > 0).
            hits, num_hit = [], req.num_computed_tokens
            if req.num_computed_tokens == 0:
                hits, num_hit = self.kv.get_computed_blocks(req)
            num_new = min(req.num_tokens - num_hit, budget)
            if not self.kv.allocate_slots(req, num_new, hits):
                break
            self.waiting.pop(0)
            if req.status == RequestStatus.WAITING:
                req.num_cached_tokens = num_hit
            req.num_computed_tokens = num_hit
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            granted[req.request_id] = num_new
            budget -= num_new

        for req in self.running:
            if req.request_id in granted:
                if req.spec_token_ids:
                    out.drafts[req.request_id] = req.spec_token_ids
                out.requests.append(req)
                out.num_new_tokens.append(granted[req.request_id])
                out.block_ids.append(self.kv.block_ids(req.request_id))
        return out

    @staticmethod
    def _with_drafts(req: Request, num_new: int, budget: int) -> int:
        """The step's tokens with the drafts that fit the budget (the engine already
        kept them within max_tokens and max_model_len); drafts only ride along with
        the request's last token."""
        if num_new != req.num_tokens - req.num_computed_tokens:
            req.spec_token_ids = []
            return num_new
        fit = budget - num_new
        if fit < len(req.spec_token_ids):
            req.spec_token_ids = req.spec_token_ids[:fit]
        return num_new + len(req.spec_token_ids)

    def _pick_victim(self) -> Request:
        # Lowest priority (largest value) first; among equals the most recently started.
        return max(reversed(self.running), key=lambda r: r.priority)

    def preempt(self, req: Request) -> None:
        """Free a running request's blocks and queue it to be recomputed."""
        if req in self.running:
            self._preempt(req)

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.kv.free(req)
        req.num_computed_tokens = 0
        req.draft_computed = 0
        req.spec_token_ids = []
        req.status = RequestStatus.PREEMPTED
        req.num_preemptions += 1
        self.num_preemptions += 1
        self._enqueue(req, -1)   # back to the front of its priority class
