"""Prompt-lookup (n-gram) proposals: what followed the last tokens where they
appeared before. Free to compute and often right where the output quotes its input
(summaries, code edits, extraction)."""
from __future__ import annotations


class NgramProposer:
    def __init__(self, min_n: int, max_n: int) -> None:
        self.min_n, self.max_n = min_n, max_n

    def propose(self, tokens: list[int], k: int) -> list[int]:
        """Up to ``k`` tokens that followed the first occurrence of the longest suffix
        of ``tokens`` (``max_n`` down to ``min_n`` long); [] if none. The first, as
        vLLM's: it has the longest continuation (in a run of one repeated token the
        latest match is one position back and would propose a single token).

        Every match ends at an earlier copy of the last token, so one C-speed scan
        (``list.index``) finds the candidates, and each is extended backwards: on text
        that does not repeat itself (most requests, every probe of one) this costs a
        scan of the list, not a pass per n-gram length."""
        L = len(tokens)
        top = min(self.max_n, L - 1)
        if k <= 0 or L <= self.min_n or top < self.min_n:
            return []
        last = tokens[-1]
        first_end: dict[int, int] = {}   # n -> the first match's end, for n in min_n..top
        j = -1
        while True:
            try:
                j = tokens.index(last, j + 1, L - 1)   # a match must be followed by a token
            except ValueError:
                break
            m = 1
            while m < top and m <= j and tokens[j - m] == tokens[L - 1 - m]:
                m += 1
            for n in range(self.min_n, m + 1):
                first_end.setdefault(n, j)
            if m >= top:
                break   # the longest length has its first match: nothing later matters
        if not first_end:
            return []
        start = first_end[max(first_end)] + 1
        return tokens[start:start + k]
