"""Label math for AI preference judging (the CAI paper's soft labels)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


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


UNINFORMATIVE_MARGIN = 0.02  # a label within this of 0.5 says the judge cannot tell the pair apart


def position_consistent(p_first_ab: float, p_first_ba: float) -> bool:
    """Both orderings pick the same winner: A wins when first (p_first_ab > 0.5) exactly when it
    wins when second (p_first_ba < 0.5). A judge that always picks one position fails this."""
    return (p_first_ab > 0.5) == (p_first_ba < 0.5)


@dataclass(frozen=True)
class LabelSignal:
    """How much a set of labels can teach: the share that sits at 0.5, and how often the judge's
    two orderings agreed (None when no pair was judged in both orders)."""

    labels: int
    uninformative_share: float  # labels with |p - 0.5| <= UNINFORMATIVE_MARGIN
    mean_margin: float  # mean |p - 0.5|
    both_orders: int  # principle verdicts judged in both orderings
    position_consistency: float | None

    @property
    def warning(self) -> str | None:
        """What to try when most labels carry no signal; None when they do."""
        if not self.labels or self.uninformative_share <= 0.5:
            return None
        bias = ""
        if self.position_consistency is not None:
            bias = (
                f"; the two orderings agreed on the winner in {self.position_consistency:.0%} of "
                "the verdicts, so position bias decides most of them"
            )
        return (
            f"most labels carry no signal: {self.uninformative_share:.0%} of {self.labels} are within "
            f"{UNINFORMATIVE_MARGIN} of 0.5{bias}. DPO learns almost nothing from them. Try scoring in "
            "float32 (--dtype float32), more principles per label (-k 4), a bigger feedback model "
            "(--judge-model), or chain-of-thought judging (--cot)."
        )

    def to_dict(self) -> dict[str, object]:
        return {
            "labels": self.labels,
            "uninformative_share": self.uninformative_share,
            "uninformative_margin": UNINFORMATIVE_MARGIN,
            "mean_margin": self.mean_margin,
            "both_orders": self.both_orders,
            "position_consistency": self.position_consistency,
            "warning": self.warning,
        }


def label_signal(ps: Sequence[float], orderings: Sequence[tuple[float, float]]) -> LabelSignal:
    """The signal of labels `ps` (p(A better)), with the (p_first_ab, p_first_ba) of every
    verdict judged in both orderings."""
    n = len(ps)
    flat = sum(round(abs(p - 0.5), 9) <= UNINFORMATIVE_MARGIN for p in ps)  # 0.52 counts
    agree = sum(position_consistent(ab, ba) for ab, ba in orderings)
    return LabelSignal(
        labels=n,
        uninformative_share=flat / n if n else 0.0,
        mean_margin=sum(abs(p - 0.5) for p in ps) / n if n else 0.0,
        both_orders=len(orderings),
        position_consistency=agree / len(orderings) if orderings else None,
    )
