"""Verification of point-mass (deterministic) drafts, exact for the target.

Rejection sampling (Leviathan et al. 2023; Chen et al. 2023) accepts draft ``d``
with probability ``min(1, p(d) / q(d))`` and otherwise draws from the residual
``max(p - q, 0)``. For a proposer that puts all its mass on ``d`` (``q = δ_d``)
this is: accept with probability ``p(d)``, else draw from ``p`` with ``d`` removed,
which is exactly what drawing ``x ~ p`` and accepting iff ``x == d`` does (on a
miss, ``x`` is the correction token). So the runner samples every verify row with
the ordinary sampler (temperature, filters, penalties, seeds) and this module
only compares: row j's draw is conditioned on the drafts before it, which are the
emitted tokens whenever row j is reached. The row after the last accepted draft
gives the correction, or the bonus token when all were accepted.
"""
from __future__ import annotations


def num_accepted(sampled: list[int], drafts: list[int]) -> int:
    """Leading drafts equal to the target's draws at their rows (``sampled`` has one
    more row than ``drafts``: the bonus)."""
    for j, d in enumerate(drafts):
        if sampled[j] != d:
            return j
    return len(drafts)
