"""What the engine returns: vLLM-shaped ``RequestOutput`` / ``CompletionOutput``."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# One dict per position: token id -> Logprob (the chosen token plus the top-N).
PositionLogprobs = dict[int, Logprob]


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: list[PositionLogprobs] | None = None
    finish_reason: str | None = None      # "stop" | "length" | "abort" | None while running
    stop_reason: int | str | None = None  # the stop string or token id that ended it

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    num_cached_tokens: int = 0
    metrics: dict = field(default_factory=dict)


@dataclass
class BeamSearchSequence:
    """One finished beam, as vLLM's: ``tokens`` holds the prompt's ids and the generated ones."""

    tokens: list[int]
    cum_logprob: float
    logprobs: list[PositionLogprobs] = field(default_factory=list)   # per generated token
    text: str | None = None           # the generated tokens' text
    finish_reason: str | None = None  # "stop" (EOS) or "length"


@dataclass
class BeamSearchOutput:
    sequences: list[BeamSearchSequence]   # best first


@dataclass
class PoolingRequestOutput:
    """An embedding request's result: the pooled final hidden state, L2-normalized."""

    request_id: str
    prompt_token_ids: list[int]
    embedding: list[float]
    finished: bool = True
    finish_reason: str = "stop"           # "error" if its step failed, "abort"
