"""Per-request sampling settings, validated at construction (vLLM's field names).

Everything a client can set is checked here, before a request reaches the engine,
so that no value can make a batched step fail for the other requests in it: types
(a bool is not an int), finite floats, integers within int64 (the sampler's arrays),
and bounded stop lists. Checks that need the model (vocabulary, ``max_n``, context
length) are ``LLMEngine.check_params``'s; the server and the offline API share both.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
MAX_STOP_STRINGS = 64          # more would make every step's stop check costly
MAX_STOP_STRING_CHARS = 1024
MAX_STOP_TOKEN_IDS = 1024


@dataclass
class SamplingParams:
    """How to sample one request. Invalid values raise ``ValueError`` naming the field."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0                      # 0 or -1: no top-k filter
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    max_tokens: int | None = 16         # None: up to the context length
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None         # top-N logprobs per generated token
    prompt_logprobs: int | None = None  # top-N logprobs per prompt token
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    truncate_prompt_tokens: int | None = None   # keep only the prompt's last N tokens
    stop_strings: list[str] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        if self.top_k == -1:
            self.top_k = 0
        if not isinstance(self.stop, (str, list, tuple, type(None))):
            raise _bad("stop", "must be a string or a list of strings", self.stop)
        if not isinstance(self.stop_token_ids, (list, tuple, type(None))):
            raise _bad("stop_token_ids", "must be a list of token ids", self.stop_token_ids)
        self.stop_strings = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self._validate()

    def _validate(self) -> None:
        _int("n", self.n, 1)
        _float("temperature", self.temperature, 0.0)
        _float("top_p", self.top_p, 0.0, 1.0, low_open=True)
        _int("top_k", self.top_k, 0, why="must be -1, 0 (disabled) or a positive integer")
        _float("min_p", self.min_p, 0.0, 1.0)
        _float("presence_penalty", self.presence_penalty, -2.0, 2.0)
        _float("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        _float("repetition_penalty", self.repetition_penalty, 0.0, low_open=True)
        if self.max_tokens is not None:
            _int("max_tokens", self.max_tokens, 1)
        _int("min_tokens", self.min_tokens, 0)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise _bad("min_tokens", f"must be <= max_tokens ({self.max_tokens})", self.min_tokens)
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None:
                _int(name, getattr(self, name), 0)
        if self.seed is not None:
            _int("seed", self.seed, INT64_MIN)
        if self.truncate_prompt_tokens is not None:
            _int("truncate_prompt_tokens", self.truncate_prompt_tokens, 1)
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens",
                     "spaces_between_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise _bad(name, "must be a boolean", getattr(self, name))
        if len(self.stop_strings) > MAX_STOP_STRINGS:
            raise ValueError(f"stop: at most {MAX_STOP_STRINGS} stop strings, got {len(self.stop_strings)}")
        for s in self.stop_strings:
            if not isinstance(s, str) or not s:
                raise _bad("stop", "must be non-empty strings", s)
            if len(s) > MAX_STOP_STRING_CHARS:
                raise ValueError(f"stop: a stop string has {len(s)} characters, "
                                 f"at most {MAX_STOP_STRING_CHARS} are allowed")
            check_text("stop", s)
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise ValueError(f"stop_token_ids: at most {MAX_STOP_TOKEN_IDS} ids, "
                             f"got {len(self.stop_token_ids)}")
        for t in self.stop_token_ids:
            _int("stop_token_ids", t, 0, why="must be token ids (integers >= 0)")

    def truncate(self, prompt_token_ids: list[int]) -> list[int]:
        """The prompt as the engine computes it: its last ``truncate_prompt_tokens``."""
        k = self.truncate_prompt_tokens
        return prompt_token_ids if k is None or len(prompt_token_ids) <= k else prompt_token_ids[-k:]

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5


def _bad(name: str, why: str, value) -> ValueError:
    text = repr(value)
    return ValueError(f"{name} {why}, got {text if len(text) <= 80 else text[:77] + '...'}")


def _int(name: str, value, low: int, why: str | None = None) -> None:
    """An int (not a bool) in [low, int64 max]: the sampler packs these into int64 arrays."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= INT64_MAX:
        bound = "an integer" if low == INT64_MIN else f"an integer >= {low}"
        raise _bad(name, why or f"must be {bound} and fit in 64 bits", value)


def _float(name: str, value, low: float, high: float = math.inf, low_open: bool = False) -> None:
    """A finite real number in the range: NaN passes every comparison, so it is refused first."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _bad(name, "must be a finite number", value)
    if value < low or (low_open and value == low) or value > high:
        lo = "(" if low_open else "["
        hi = "]" if high != math.inf else ")"
        raise _bad(name, f"must be in {lo}{low:g}, {high:g}{hi}", value)


def check_text(name: str, text: str) -> None:
    """Refuse strings that are not valid Unicode text (a lone surrogate from JSON ``\\ud800``):
    the tokenizer would raise deep inside the request."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{name}: not valid Unicode text ({e.reason} at position {e.start})") from None


@dataclass
class BeamSearchParams:
    """``LLM.beam_search``'s settings (vLLM's): ``beam_width`` beams, each step keeping
    the best ``beam_width`` continuations by cumulative logprob / length^length_penalty."""

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0

    def __post_init__(self) -> None:
        _int("beam_width", self.beam_width, 1)
        _int("max_tokens", self.max_tokens, 1)
        _float("temperature", self.temperature, 0.0)
        _float("length_penalty", self.length_penalty, -math.inf)
        if not isinstance(self.ignore_eos, bool):
            raise _bad("ignore_eos", "must be a boolean", self.ignore_eos)
