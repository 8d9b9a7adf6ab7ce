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
MAX_LOGIT_BIAS = 1024          # OpenAI's tokens per logit_bias (its own limit is 300)
MAX_BAD_WORDS = 256
MAX_GRAMMAR_CHARS = 1 << 20    # a schema, regex or grammar; the server caps bodies anyway


@dataclass
class StructuredOutputsParams:
    """One constraint on the output (vLLM's names), enforced by a grammar engine: a
    JSON schema, any JSON object, a regex, one of several strings, or an EBNF grammar."""

    json: str | dict | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None

    def __post_init__(self) -> None:
        given = [name for name in ("json", "regex", "choice", "grammar", "json_object")
                 if getattr(self, name) not in (None, False)]
        if len(given) != 1:
            raise ValueError("structured_outputs: exactly one of json, regex, choice, grammar, "
                             f"json_object must be set, got {given or 'none'}")
        if self.json is not None and not isinstance(self.json, (str, dict)):
            raise _bad("structured_outputs.json", "must be a JSON schema (a dict or its text)", self.json)
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise _bad(f"structured_outputs.{name}", "must be a non-empty string", value)
        if self.choice is not None:
            if (not isinstance(self.choice, (list, tuple)) or not self.choice
                    or not all(isinstance(c, str) and c for c in self.choice)):
                raise _bad("structured_outputs.choice", "must be a non-empty list of non-empty strings",
                           self.choice)
            self.choice = list(self.choice)
        if self.json_object is not None and not isinstance(self.json_object, bool):
            raise _bad("structured_outputs.json_object", "must be a boolean", self.json_object)
        size = len(str(self.json or self.regex or self.grammar or self.choice or ""))
        if size > MAX_GRAMMAR_CHARS:
            raise ValueError(f"structured_outputs: {size} characters, at most {MAX_GRAMMAR_CHARS}")

    @property
    def kind(self) -> str:
        return next(n for n in ("json", "regex", "choice", "grammar", "json_object")
                    if getattr(self, n) not in (None, False))


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
    # ---- logits masks and structured output (issue 22) ----
    logit_bias: dict[int, float] | None = None     # token id -> added to its logit, in [-100, 100]
    allowed_token_ids: list[int] | None = None     # only these may be sampled
    bad_words: list[str] | None = None             # never generated (their last token is banned)
    structured_outputs: StructuredOutputsParams | None = None
    # The engine's: bad_words as token ids (``LLMEngine`` tokenizes them).
    bad_words_token_ids: list[list[int]] = field(init=False, default_factory=list)
    # Whether the sampler edits this request's logits (a plain flag: read per row per step).
    masks_logits: bool = field(init=False, default=False)
    # ---- end of the logits-mask block ----
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
        self._validate_masks()

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

    def _validate_masks(self) -> None:
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                raise _bad("logit_bias", "must map token ids to biases", self.logit_bias)
            if len(self.logit_bias) > MAX_LOGIT_BIAS:
                raise ValueError(f"logit_bias: at most {MAX_LOGIT_BIAS} tokens, got {len(self.logit_bias)}")
            bias = {}
            for k, v in self.logit_bias.items():
                key = int(k) if isinstance(k, str) and k.isdigit() else k
                _int("logit_bias", key, 0, why="keys must be token ids (integers >= 0)")
                _float("logit_bias", v, -100.0, 100.0)
                bias[key] = float(v)
            self.logit_bias = bias or None
        if self.allowed_token_ids is not None:
            if not isinstance(self.allowed_token_ids, (list, tuple)) or not self.allowed_token_ids:
                raise _bad("allowed_token_ids", "must be a non-empty list of token ids",
                           self.allowed_token_ids)
            for t in self.allowed_token_ids:
                _int("allowed_token_ids", t, 0, why="must be token ids (integers >= 0)")
            self.allowed_token_ids = sorted(set(self.allowed_token_ids))
        if self.bad_words is not None:
            if not isinstance(self.bad_words, (list, tuple)) or len(self.bad_words) > MAX_BAD_WORDS:
                raise _bad("bad_words", f"must be a list of at most {MAX_BAD_WORDS} strings", self.bad_words)
            for w in self.bad_words:
                if not isinstance(w, str) or not w:
                    raise _bad("bad_words", "must be non-empty strings", w)
                check_text("bad_words", w)
            self.bad_words = list(self.bad_words) or None
        if self.structured_outputs is not None and not isinstance(
                self.structured_outputs, StructuredOutputsParams):
            raise _bad("structured_outputs", "must be a StructuredOutputsParams", self.structured_outputs)
        self.masks_logits = bool(self.logit_bias or self.allowed_token_ids or self.bad_words
                                 or self.structured_outputs is not None)

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1 or bool(self.presence_penalty) or bool(self.frequency_penalty)


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
