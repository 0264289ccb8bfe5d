"""The label signal `cai up` reports: uninformative share, position consistency and the warning."""

from __future__ import annotations

import pytest

from cai import constitution, labels, pipeline
from cai import records as record_model
from cai.backends.base import Completion
from cai.engine import ComparisonResult, PrincipleLabel


def test_position_consistency_asks_whether_both_orderings_pick_one_winner():
    assert labels.position_consistent(0.8, 0.3)  # A wins first, and wins second (B first loses)
    assert labels.position_consistent(0.3, 0.8)  # B wins in both orderings
    # The example: the first option wins whatever it is, p_first 0.2227 both ways.
    assert not labels.position_consistent(0.2227, 0.2227)
    assert not labels.position_consistent(0.7, 0.7)


def test_uninformative_share_counts_labels_within_the_margin_of_a_half():
    consistent, flipped = (0.6, 0.4), (0.6, 0.6)
    signal = labels.label_signal(
        [(0.5, [consistent]), (0.52, []), (0.48, []), (0.53, [flipped]), (0.9, [consistent, consistent])]
    )
    assert signal.labels == 5
    assert signal.uninformative_share == pytest.approx(3 / 5)  # 0.52 and 0.48 are on the margin
    assert signal.mean_margin == pytest.approx((0 + 0.02 + 0.02 + 0.03 + 0.4) / 5)
    assert signal.both_orders == 4 and signal.position_consistency == pytest.approx(3 / 4)
    assert signal.no_signal_share == pytest.approx(4 / 5)  # 0.53's orderings disagree
    assert signal.to_dict()["uninformative_margin"] == labels.UNINFORMATIVE_MARGIN


def test_the_warning_appears_when_most_labels_carry_no_signal_and_says_what_to_try():
    flat = labels.label_signal([(0.5, []), (0.5, []), (0.51, []), (0.9, [])])
    assert flat.warning is not None and "75% of 4" in flat.warning
    assert flat.position_consistency is None and "orderings" not in flat.warning
    for remedy in ("--dtype float32", "-k", "--judge-model", "--cot"):
        assert remedy in flat.warning
    # Far from 0.5, but every verdict follows the position: no signal either.
    biased = labels.label_signal([(0.45, [(0.3, 0.4)]), (0.44, [(0.28, 0.4)]), (0.9, [(0.9, 0.1)])])
    assert biased.uninformative_share == 0
    assert biased.warning is not None and "agreed on the winner in 33% of 3 verdicts" in biased.warning
    assert labels.label_signal([(0.5, []), (0.9, [])]).warning is None  # half is not most
    assert labels.label_signal([]).warning is None


def test_the_run_signal_reads_each_preference_and_each_principle_verdict():
    cons = constitution.load("default")
    principle = cons.principles[0].id
    prefs = []
    for i, (p_ab, p_ba) in enumerate([(0.2227, 0.2227), (0.9, 0.2), (0.6, 0.45)]):
        prompt = record_model.Prompt(f"p{i}", "Say hi.", "test", seed=i)
        rollout = record_model.rollout_of(prompt, [Completion("Hi.", 1, "stop")] * 2, "m")
        judgment = ComparisonResult(labels.debias(p_ab, p_ba), [PrincipleLabel(principle, 0, p_ab, p_ba)])
        prefs.append(record_model.preference_of(rollout, judgment, cons, "m"))
    signal = pipeline.label_signal(prefs)
    assert signal.labels == 3 and signal.both_orders == 3
    assert signal.position_consistency == pytest.approx(2 / 3)
    assert signal.uninformative_share == pytest.approx(1 / 3)  # 0.5, 0.85 and 0.575
    assert signal.no_signal_share == pytest.approx(1 / 3)


def test_the_up_summary_prints_the_signal_and_the_warning(capsys):
    from cli.up import _print_summary

    signal = labels.label_signal([(0.5, [(0.2227, 0.2227)]), (0.6, [(0.7, 0.4)]), (0.45, [(0.3, 0.4)])])
    info = {
        "summary": [],
        "signals": signal.to_dict(),
        "counts": {"sft": 3, "preferences": 3, "revisions": 3},
        "duration_s": 1.0,
    }
    _print_summary(info, "revision", pipeline.Path("runs/x"))
    out = " ".join(capsys.readouterr().out.split())
    assert "label signal: 33% of 3 labels within 0.02 of 0.5" in out
    assert "position consistency 33% of 3 verdicts" in out
    assert "warning: most labels carry no signal (67% of 3)" in out
