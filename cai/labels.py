"""Label math for AI preference judging (the CAI paper's soft labels)."""

from __future__ import annotations

import math
from collections.abc import Sequence


def option_probability(logp_a: float, logp_b: float) -> float:
    """p(A) = e^lA / (e^lA + e^lB): the option log-probs normalised over the two options."""
    margin = logp_a - logp_b
    if margin >= 0:  # the two branches keep exp() from overflowing
        return 1.0 / (1.0 + math.exp(-margin))
    return math.exp(margin) / (1.0 + math.exp(margin))


def debias(p_first_ab: float, p_first_ba: float) -> float:
    """p(A better) from both orderings: (A, B) gives p_first_ab, (B, A) gives p_first_ba.

    In the swapped ordering A is the second option, so it wins with 1 - p_first_ba. The average
    cancels a constant preference for whichever option comes first.
    """
    return (p_first_ab + (1.0 - p_first_ba)) / 2.0


def clamp(p: float, low: float, high: float) -> float:
    """Chain-of-thought labels come out near 0 or 1; the paper clamps them to [0.4, 0.6]."""
    return min(max(p, low), high)


def ensemble(ps: Sequence[float]) -> float:
    """Average the labels of k principles."""
    if not ps:
        raise ValueError("ensemble needs at least one label")
    return sum(ps) / len(ps)
