"""How many tokens a request proposes next, from how its last proposals fared.

A proposal that keeps being rejected costs verification work for nothing, so the
count halves on every fully rejected verify (4, 2, 1, 0); at 0 the request decodes
as a plain row and probes again with one token after ``probe_every`` steps. Any
accepted token sets the count to one more than were accepted (up to the cap).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class AdaptiveDraftLength:
    max_k: int
    k: int = 0
    idle_steps: int = 0
    probe_every: int = 16

    def __post_init__(self) -> None:
        self.k = self.max_k

    @property
    def wants_drafts(self) -> bool:
        """Whether ``next_k`` will ask for drafts (so the engine must know the latest token)."""
        return self.k > 0 or self.idle_steps + 1 >= self.probe_every

    def next_k(self) -> int:
        """Drafts to ask for this step (called once per decode step of the request)."""
        if self.k == 0:
            self.idle_steps += 1
            if self.idle_steps < self.probe_every:
                return 0
            self.idle_steps = 0
            return 1
        return self.k

    def update(self, num_proposed: int, num_accepted: int) -> None:
        if num_accepted == 0:
            self.k = min(self.k, num_proposed) // 2
        else:
            self.k = min(self.max_k, num_accepted + 1)
