"""``speculative_config`` as vLLM spells it: a dict (or its JSON) naming a method."""
from __future__ import annotations

import json
from dataclasses import dataclass

_METHODS = ("ngram",)


@dataclass(frozen=True)
class SpeculativeConfig:
    """``{"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_min": a,
    "prompt_lookup_max": b}``: drafts are the tokens that followed the longest
    earlier match (``a`` to ``b`` tokens) of the sequence's last tokens."""

    method: str = "ngram"
    num_speculative_tokens: int = 4
    prompt_lookup_min: int = 1
    prompt_lookup_max: int = 4

    def __post_init__(self) -> None:
        if self.method == "draft_model":
            raise ValueError("speculative_config.method: 'draft_model' is not supported yet "
                             "(only 'ngram')")
        if self.method not in _METHODS:
            raise ValueError(f"speculative_config.method: must be one of {list(_METHODS)}, "
                             f"got {self.method!r}")
        for name in ("num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 64:
                raise ValueError(f"speculative_config.{name}: must be an integer in 1..64, "
                                 f"got {value!r}")
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError(f"speculative_config.prompt_lookup_min: {self.prompt_lookup_min} "
                             f"exceeds prompt_lookup_max {self.prompt_lookup_max}")

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
        known = {"method", "num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max"}
        unknown = sorted(set(value) - known - {"model"})
        if unknown:
            raise ValueError(f"speculative_config.{unknown[0]}: unknown field")
        if "method" not in value:
            raise ValueError("speculative_config.method: missing")
        if value["method"] != "draft_model" and "model" in value:
            raise ValueError("speculative_config.model: only for method 'draft_model'")
        return cls(**{k: v for k, v in value.items() if k in known})
