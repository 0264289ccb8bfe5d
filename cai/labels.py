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
    """How much a set of labels can teach. A label carries no signal when it sits at 0.5, or when
    its two orderings disagree on the winner: then the position, not the content, decided it."""

    labels: int
    uninformative_share: float  # labels with |p - 0.5| <= UNINFORMATIVE_MARGIN
    mean_margin: float  # mean |p - 0.5|
    both_orders: int  # principle verdicts judged in both orderings
    position_consistency: float | None  # share of those whose orderings agree; None: none judged
    no_signal_share: float  # labels uninformative or with a verdict whose orderings disagree

    @property
    def warning(self) -> str | None:
        """What to try when most labels carry no signal; None when they do."""
        if not self.labels or self.no_signal_share <= 0.5:
            return None
        consistency = ""
        if self.position_consistency is not None:
            consistency = (
                f", and the two orderings of a pair agreed on the winner in "
                f"{self.position_consistency:.0%} of {self.both_orders} verdicts (the rest were "
                "decided by position, not content)"
            )
        return (
            f"most labels carry no signal ({self.no_signal_share:.0%} of {self.labels}): "
            f"{self.uninformative_share:.0%} are within {UNINFORMATIVE_MARGIN} of 0.5{consistency}. "
            "Training on them teaches little. Try scoring in float32 (--dtype float32), more "
            "principles per label (-k 4), a bigger feedback model (--judge-model), or "
            "chain-of-thought judging (--cot)."
        )

    def to_dict(self) -> dict[str, object]:
        return {
            "labels": self.labels,
            "uninformative_share": self.uninformative_share,
            "uninformative_margin": UNINFORMATIVE_MARGIN,
            "mean_margin": self.mean_margin,
            "both_orders": self.both_orders,
            "position_consistency": self.position_consistency,
            "no_signal_share": self.no_signal_share,
            "warning": self.warning,
        }


def label_signal(labels: Sequence[tuple[float, Sequence[tuple[float, float]]]]) -> LabelSignal:
    """The signal of `labels`: each is p(A better) with the (p_first_ab, p_first_ba) of its
    verdicts judged in both orderings (none with one ordering)."""
    n = len(labels)
    flat = [round(abs(p - 0.5), 9) <= UNINFORMATIVE_MARGIN for p, _ in labels]  # 0.52 counts
    agree = [[position_consistent(ab, ba) for ab, ba in orders] for _, orders in labels]
    verdicts = sum(len(a) for a in agree)
    no_signal = sum(f or not all(a) for f, a in zip(flat, agree, strict=True))
    return LabelSignal(
        labels=n,
        uninformative_share=sum(flat) / n if n else 0.0,
        mean_margin=sum(abs(p - 0.5) for p, _ in labels) / n if n else 0.0,
        both_orders=verdicts,
        position_consistency=sum(map(sum, agree)) / verdicts if verdicts else None,
        no_signal_share=no_signal / n if n else 0.0,
    )
