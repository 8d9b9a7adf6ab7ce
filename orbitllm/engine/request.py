"""One sequence being generated: its tokens, counters and status.

vLLM v1's idea: no prefill/decode phases. A request has ``num_tokens``
(prompt + generated) and ``num_computed_tokens`` (whose KV is in the cache);
each step the scheduler grants tokens so the second catches up with the first.
Chunked prefill, prefix-cache hits and preemption are all that arithmetic.
"""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from orbitllm.engine.step_data import ScheduledRequest
from orbitllm.sampling_params import SamplingParams
from orbitllm.spec.adaptive import AdaptiveDraftLength


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED = "finished"


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    eos_token_id: int | None = None
    priority: int = 0
    cache_salt: str | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    seed: int | None = None            # per-sequence seed (the parent's, mixed with the index)

    output_token_ids: list[int] = field(default_factory=list)
    # Tokens sampled on the device whose ids the host has not read yet (overlapped
    # scheduling): they count in num_tokens, and the runner feeds them from the device.
    num_pending: int = 0
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0         # prompt tokens found in the prefix cache at first schedule
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_preemptions: int = 0
    block_hashes: list[bytes] = field(default_factory=list)
    # Logprobs gathered by the sampler, one entry per generated/prompt position.
    logprobs: list[dict] = field(default_factory=list)
    prompt_logprobs: list[dict | None] = field(default_factory=list)
    cumulative_logprob: float = 0.0
    first_token_time: float | None = None
    first_scheduled_time: float | None = None
    grammar: object | None = None      # structured output: its SequenceGrammar, while it runs
    # Speculative decoding (None / empty when the engine does not speculate): how many
    # tokens to propose, and this step's proposal (positions num_tokens onward).
    draft_length: AdaptiveDraftLength | None = None
    spec_token_ids: list[int] = field(default_factory=list)
    # A draft model's KV of this request is valid for its first draft_computed positions
    # (spec/draft_model.py: the draft catches up from there; 0 again once the blocks go).
    draft_computed: int = 0

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids) + self.num_pending

    @property
    def num_known_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_range(self, start: int, end: int) -> list[int]:
        """Tokens ``[start, end)`` of prompt + output without building the whole list."""
        p = len(self.prompt_token_ids)
        if end <= p:
            return self.prompt_token_ids[start:end]
        if start >= p:
            return self.output_token_ids[start - p:end - p]
        return self.prompt_token_ids[start:] + self.output_token_ids[:end - p]

    @property
    def is_finished(self) -> bool:
        return self.status == RequestStatus.FINISHED

    @property
    def max_tokens_reached(self) -> bool:
        mt = self.params.max_tokens
        return mt is not None and self.num_output_tokens + self.num_pending >= mt

    @property
    def uses_prefix_cache(self) -> bool:
        # Prompt logprobs need every prompt position computed, so they skip cache hits.
        return self.params.prompt_logprobs is None

    @property
    def needs_host_tokens(self) -> bool:
        """Penalties, bad words and prompt logprobs read tokens on the host, so a step
        with this request cannot run ahead of the previous step's results. (A grammar
        reads them too, but late: ``SchedulerOutput.late_bitmasks``.)"""
        return self.params.prompt_logprobs is not None or _needs_history(self.params)

    def scheduled(self, num_new_tokens: int, block_ids: list[int]) -> ScheduledRequest:
        """This step's part of the request as plain data: its new tokens (only those),
        and its sampling inputs when the step reaches the last token."""
        # The hot path of every step, per request: plain reads, no property calls.
        start = self.num_computed_tokens
        end = start + num_new_tokens
        p = self.params
        prompt, output = self.prompt_token_ids, self.output_token_ids
        num_prompt = len(prompt)
        known = num_prompt + len(output)
        upto = end if end < known else known
        tokens = (output[start - num_prompt:upto - num_prompt] if start >= num_prompt
                  else self.token_range(start, upto))
        drafts = self.spec_token_ids
        if drafts:   # the scheduler granted the last token plus every draft
            tokens = tokens + drafts
            end -= len(drafts)
        s = ScheduledRequest(self.request_id, start, num_new_tokens, tokens, block_ids, p)
        if end == known + self.num_pending:
            s.num_sampled = 1
            if drafts:
                s.num_sampled += len(drafts)
                s.draft_token_ids = drafts
            s.seed = self.seed
            s.num_output_tokens = len(output) + self.num_pending
            s.num_prompt_tokens = num_prompt
            if _needs_history(p):
                s.history = self.all_token_ids
        if p.prompt_logprobs is not None and start < len(self.prompt_token_ids) - 1:
            last = min(end, len(self.prompt_token_ids) - 1)   # position j predicts token j + 1
            s.prompt_logprob_targets = self.prompt_token_ids[start + 1:last + 1]
        return s


@dataclass
class PoolingRequest(Request):
    """A prompt whose final hidden states are pooled into an embedding: it samples
    nothing, and its KV blocks are freed as soon as its prompt is computed. A subclass,
    so that generation requests pay nothing for it in the per-step path."""

    pooling: str = "last"                  # "last" token or "mean" over the prompt
    pooled_total: object = None            # running sum of hidden states (mean)
    pooled_last: object = None

    @property
    def uses_prefix_cache(self) -> bool:
        return False   # cached positions have no hidden states to pool

    def scheduled(self, num_new_tokens: int, block_ids: list[int]) -> ScheduledRequest:
        s = super().scheduled(num_new_tokens, block_ids)
        s.num_sampled = 0
        return s


def _needs_history(p: SamplingParams) -> bool:
    """Penalties read every token; bad words of several tokens the output's last ones."""
    return p.has_penalties or (p.masks_logits and bool(p.bad_words_token_ids))
