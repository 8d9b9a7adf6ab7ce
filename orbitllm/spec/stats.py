"""Counters of proposals and acceptances, as vLLM's spec-decode metrics count them."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SpecDecodeStats:
    num_drafts: int = 0              # verify steps of one sequence
    num_draft_tokens: int = 0        # tokens proposed
    num_accepted_tokens: int = 0     # proposed tokens the target accepted
    accepted_per_pos: list[int] = field(default_factory=list)   # accepted at draft position i

    def record(self, num_proposed: int, num_accepted: int) -> None:
        self.num_drafts += 1
        self.num_draft_tokens += num_proposed
        self.num_accepted_tokens += num_accepted
        if len(self.accepted_per_pos) < num_proposed:
            self.accepted_per_pos += [0] * (num_proposed - len(self.accepted_per_pos))
        for i in range(num_accepted):
            self.accepted_per_pos[i] += 1

    def since(self, earlier: "SpecDecodeStats") -> "SpecDecodeStats":
        """The counts added after ``earlier`` (a copy taken before a run), per-position
        counts left out."""
        return SpecDecodeStats(self.num_drafts - earlier.num_drafts,
                               self.num_draft_tokens - earlier.num_draft_tokens,
                               self.num_accepted_tokens - earlier.num_accepted_tokens)

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens emitted per verify step: the accepted drafts plus the target's own."""
        return 1 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 0.0
