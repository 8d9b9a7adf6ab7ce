"""Incremental detokenization with stop strings.

Decoding token by token breaks multi-byte characters (a UTF-8 character can
span tokens) and word-boundary spaces (SentencePiece). We decode a small
sliding window of ids and emit only text that is complete: when the window
ends in U+FFFD (an unfinished byte sequence) we wait for the next token.
"""
from __future__ import annotations

# Prompt tokens kept as left context so the first output token decodes with
# the right leading space.
_CONTEXT = 5


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_ids: list[int], skip_special_tokens: bool,
                 stop_strings: list[str], include_stop_str_in_output: bool,
                 spaces_between_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        # A fast tokenizer's Rust backend decodes ~7x faster than the Python wrapper.
        self._backend = getattr(tokenizer, "_tokenizer", None)
        self.skip_special_tokens = skip_special_tokens
        self.stop_strings = stop_strings
        self.include_stop = include_stop_str_in_output
        self.max_stop_len = max((len(s) for s in stop_strings), default=0)
        self._ids = list(prompt_ids[-_CONTEXT:])
        self._prefix = 0
        self._read = len(self._ids)
        self.text = ""
        # Bound once, so the plain path per token pays nothing for the option.
        self._added = (_added_tokens(tokenizer)
                       if tokenizer is not None and not (skip_special_tokens or spaces_between_special_tokens)
                       else None)
        self._decode = self._decode_joined if self._added else self._decode_plain

    def _decode_plain(self, ids: list[int]) -> str:
        if self._backend is not None:
            return self._backend.decode(ids, skip_special_tokens=self.skip_special_tokens)
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens,
                                     clean_up_tokenization_spaces=False)

    def _decode_joined(self, ids: list[int]) -> str:
        """``spaces_between_special_tokens=False``: added tokens as their bare text, joined
        to the text around them without the spaces a decoder (WordPiece, ...) puts there."""
        parts, run = [], []
        for t in ids:
            piece = self._added.get(t)
            if piece is None:
                run.append(t)
                continue
            if run:
                parts.append(self._decode_plain(run))
                run = []
            parts.append(piece)
        if run:
            parts.append(self._decode_plain(run))
        return "".join(parts)

    def add_token(self, token_id: int) -> str | None:
        """Append one token; returns the stop string if one now appears in the text."""
        if self.tokenizer is None:   # engine built without a tokenizer: token ids only
            return None
        self._ids.append(token_id)
        old_len = len(self.text)
        if not self._advance(final=False):
            return None
        return self._check_stop(old_len)

    def _advance(self, final: bool) -> bool:
        """Append the window's new text; unless ``final``, wait while it ends mid-character."""
        prefix_text = self._decode(self._ids[self._prefix:self._read])
        full_text = self._decode(self._ids[self._prefix:])
        if len(full_text) <= len(prefix_text) or (not final and full_text.endswith("\ufffd")):
            return False
        self.text += full_text[len(prefix_text):]
        self._prefix, self._read = self._read, len(self._ids)
        return True

    def _check_stop(self, old_len: int) -> str | None:
        if not self.stop_strings:
            return None
        best: tuple[int, str] | None = None
        for stop in self.stop_strings:
            idx = self.text.find(stop, max(0, old_len - len(stop) + 1))
            if idx != -1 and (best is None or idx < best[0]):
                best = (idx, stop)
        if best is None:
            return None
        idx, stop = best
        self.text = self.text[:idx + len(stop)] if self.include_stop else self.text[:idx]
        return stop

    def flush(self) -> None:
        """At the end, emit what was held back waiting for more bytes."""
        if self.tokenizer is not None:
            self._advance(final=True)

    def stream_text(self, finished: bool) -> str:
        """Text safe to show while streaming: a suffix that could still become the
        start of a stop string is held back until it cannot."""
        if finished or self.max_stop_len <= 1:
            return self.text
        return self.text[:max(0, len(self.text) - self.max_stop_len + 1)]


def _added_tokens(tokenizer) -> dict[int, str]:
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    return {i: getattr(t, "content", str(t)) for i, t in decoder.items()}
