"""Speculative decoding: proposers of draft tokens, and their verification.

The engine asks a proposer (``ngram``, or a smaller model: ``draft_model``) for up
to k draft tokens per decoding request; the
scheduler runs the last token plus the drafts as k + 1 query positions in one
step; the runner samples every position from the target's own distribution and
keeps the drafts up to the first one the target did not draw (``rejection``).
"""
from orbitllm.spec.config import SpeculativeConfig

__all__ = ["SpeculativeConfig"]
