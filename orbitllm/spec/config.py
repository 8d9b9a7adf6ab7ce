"""``speculative_config`` as vLLM spells it: a dict (or its JSON) naming a method."""
from __future__ import annotations

import json
from dataclasses import dataclass, fields

_METHODS = ("ngram", "draft_model")
_NGRAM_ONLY = ("prompt_lookup_min", "prompt_lookup_max")


@dataclass(frozen=True)
class SpeculativeConfig:
    """``{"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_min": a,
    "prompt_lookup_max": b}``: drafts are the tokens that followed the longest
    earlier match (``a`` to ``b`` tokens) of the sequence's last tokens.

    ``{"method": "draft_model", "model": PATH, "num_speculative_tokens": k}``: drafts
    are a smaller model's greedy continuation (a Hugging Face folder or a GGUF file
    with the target's vocabulary; ``spec/draft_model.py``)."""

    method: str = "ngram"
    num_speculative_tokens: int = 4
    prompt_lookup_min: int | None = None   # ngram only; None: 1
    prompt_lookup_max: int | None = None   # ngram only; None: 4
    model: str | None = None               # draft_model only: the draft's folder or .gguf

    def __post_init__(self) -> None:
        if self.method not in _METHODS:
            raise ValueError(f"speculative_config.method: must be one of {list(_METHODS)}, "
                             f"got {self.method!r}")
        if self.method == "ngram":
            for name, default in zip(_NGRAM_ONLY, (1, 4)):
                if getattr(self, name) is None:
                    object.__setattr__(self, name, default)
        else:
            given = [name for name in _NGRAM_ONLY if getattr(self, name) is not None]
            if given:
                raise ValueError(f"speculative_config.{given[0]}: only for method 'ngram'")
        names = ("num_speculative_tokens",) + (_NGRAM_ONLY if self.method == "ngram" else ())
        for name in names:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 64:
                raise ValueError(f"speculative_config.{name}: must be an integer in 1..64, "
                                 f"got {value!r}")
        if self.method == "ngram" and self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError(f"speculative_config.prompt_lookup_min: {self.prompt_lookup_min} "
                             f"exceeds prompt_lookup_max {self.prompt_lookup_max}")
        if self.method == "draft_model":
            if self.model is None:
                raise ValueError("speculative_config.model: missing (the draft model's folder "
                                 "or .gguf file)")
            if not isinstance(self.model, str) or not self.model:
                raise ValueError(f"speculative_config.model: must be a path, got {self.model!r}")
        elif self.model is not None:
            raise ValueError("speculative_config.model: only for method 'draft_model'")

    @classmethod
    def parse(cls, value: "SpeculativeConfig | dict | str | None") -> "SpeculativeConfig | None":
        """From ``LLM(speculative_config={...})`` or ``--speculative-config JSON``."""
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ValueError(f"speculative_config: not valid JSON ({e})") from None
        if not isinstance(value, dict):
            raise ValueError(f"speculative_config: expected a JSON object, got {type(value).__name__}")
        unknown = sorted(set(value) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"speculative_config.{unknown[0]}: unknown field")
        if "method" not in value:
            raise ValueError("speculative_config.method: missing")
        return cls(**value)
