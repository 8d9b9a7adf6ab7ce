"""Prompt-lookup (n-gram) proposals: what followed the last tokens where they
appeared before. Free to compute and often right where the output quotes its input
(summaries, code edits, extraction)."""
from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


class NgramProposer:
    def __init__(self, min_n: int, max_n: int) -> None:
        self.min_n, self.max_n = min_n, max_n

    def propose(self, tokens: list[int], k: int) -> list[int]:
        """Up to ``k`` tokens that followed the first occurrence of the longest suffix
        of ``tokens`` (``max_n`` down to ``min_n`` long); [] if none. The first, as
        vLLM's: it has the longest continuation (in a run of one repeated token the
        latest match is one position back and would propose a single token)."""
        L = len(tokens)
        if k <= 0 or L <= self.min_n:
            return []
        arr = np.asarray(tokens, dtype=np.int64)
        for n in range(min(self.max_n, L - 1), self.min_n - 1, -1):
            # Windows that start before the suffix itself and are followed by a token.
            windows = sliding_window_view(arr[:L - 1], n)
            hits = np.flatnonzero((windows == arr[L - n:]).all(axis=1))
            if hits.size:
                start = int(hits[0]) + n
                return tokens[start:start + k]
        return []
