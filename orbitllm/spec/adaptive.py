"""How many tokens a request proposes next, from how its last proposals fared.

A proposal that keeps being rejected costs verification work for nothing, so the
count halves on every fully rejected verify or empty proposal (4, 2, 1, 0); at 0 the
request decodes as a plain row (no proposer call, no extra query rows) until the
engine's next probe step, where it proposes one token again. Probes are one global
clock, not per request, so under overlapped scheduling only probe steps (1 in
``PROBE_EVERY``) have to drain the pipeline. Any accepted token sets the count to
one more than were accepted (up to the cap).
"""
from __future__ import annotations

from dataclasses import dataclass

PROBE_EVERY = 16   # steps between probes of requests whose count fell to 0


@dataclass(slots=True)
class AdaptiveDraftLength:
    max_k: int
    k: int = -1

    def __post_init__(self) -> None:
        self.k = self.max_k

    def next_k(self, probe: bool) -> int:
        """Drafts to ask for this step; ``probe``: the engine's probe step."""
        return self.k or int(probe)

    def update(self, num_proposed: int, num_accepted: int) -> None:
        if num_accepted == 0:
            self.k = min(self.k, num_proposed) // 2
        else:
            self.k = min(self.max_k, num_accepted + 1)
