"""Evaluation statistics and aggregation on known numbers (no model)."""

import json
import math

import pytest
from rich.console import Console

from cai.evaluation import (
    EvalConfig,
    EvalReport,
    PromptEval,
    comparison_table,
    hard_win,
    mean_ci,
    report_table,
    short_name,
    summarize,
)
from cli.eval import split_policy


def test_normal_interval_matches_the_formula():
    # mean 0.5, sample sd sqrt(0.2 / 3), se = sd / 2, z(0.975) = 1.959964
    low, high = mean_ci([0.2, 0.4, 0.6, 0.8], method="normal")
    half = 1.959964 * math.sqrt(0.2 / 3) / 2
    assert low == pytest.approx(0.5 - half, abs=1e-6) and high == pytest.approx(0.5 + half, abs=1e-6)
    assert (low, high) == pytest.approx((0.246970, 0.753030), abs=1e-6)
    # clipped to [0, 1]: these are probabilities
    assert mean_ci([0.0, 0.0, 1.0], method="normal")[0] == 0.0
    # a 90% interval is narrower
    low90, high90 = mean_ci([0.2, 0.4, 0.6, 0.8], method="normal", confidence=0.9)
    assert low < low90 < high90 < high


def test_bootstrap_interval():
    assert mean_ci([0.7] * 5) == (0.7, 0.7)  # no spread, no width
    assert mean_ci([0.3]) == (0.3, 0.3)  # one prompt: nothing to resample
    values = [0.0, 1.0] * 100  # mean 0.5, se = 0.5 / sqrt(200) = 0.0354
    low, high = mean_ci(values, resamples=4000, seed=1)
    assert mean_ci(values, resamples=4000, seed=1) == (low, high)  # seeded: reproducible
    assert low < 0.5 < high
    # close to the normal approximation for many prompts: 0.5 -+ 1.96 * 0.0354 = [0.431, 0.569]
    assert low == pytest.approx(0.431, abs=0.01) and high == pytest.approx(0.569, abs=0.01)
    skewed = [0.9, 0.95, 0.1, 0.92, 0.88]
    low, high = mean_ci(skewed, seed=3)
    assert min(skewed) <= low < sum(skewed) / 5 < high <= max(skewed)
    with pytest.raises(ValueError):
        mean_ci([])


def test_hard_wins_count_ties_as_half():
    assert [hard_win(p) for p in (0.9, 0.1, 0.5, 0.50005, 0.5002)] == [1.0, 0.0, 0.5, 0.5, 1.0]


def item(category: str, p: float, policy_refusal: float = 0.1, baseline_refusal: float = 0.1) -> PromptEval:
    return PromptEval("id", category, "q", 1, "a", "b", p, ["x"], policy_refusal, baseline_refusal)


ITEMS = [
    item("benign", 0.8, policy_refusal=0.2, baseline_refusal=0.9),
    item("red-team", 0.6),
    item("benign", 0.4, policy_refusal=0.45, baseline_refusal=0.7),
    item("other", 0.5),
    item("red-team", 0.7, policy_refusal=0.95),
    item("benign", 0.6, policy_refusal=0.1, baseline_refusal=0.3),
]


def test_summarize_per_category():
    config = EvalConfig(ci_method="normal", refusal_threshold=0.4)
    rows = {r.category: r for r in summarize(ITEMS, config)}
    assert list(rows) == ["red-team", "benign", "other", "all"]
    benign = rows["benign"]
    assert benign.n == 3
    assert benign.win_rate == pytest.approx(0.6)
    # sd of (0.8, 0.4, 0.6) is 0.2: 0.6 -+ 1.959964 * 0.2 / sqrt(3)
    assert benign.ci_low == pytest.approx(0.6 - 0.226317, abs=1e-5)
    assert benign.ci_high == pytest.approx(0.6 + 0.226317, abs=1e-5)
    assert benign.hard_win_rate == pytest.approx(2 / 3)
    assert benign.policy_refusal_rate == pytest.approx(1 / 3)  # 0.45 > 0.4
    assert benign.baseline_refusal_rate == pytest.approx(2 / 3)  # 0.9 and 0.7, not 0.3
    assert benign.policy_mean_p_refusal == pytest.approx(0.25)
    red = rows["red-team"]
    assert (red.n, red.win_rate, red.hard_win_rate, red.policy_refusal_rate) == (
        2,
        pytest.approx(0.65),
        1.0,
        0.5,
    )
    assert rows["other"].hard_win_rate == 0.5 and rows["other"].ci_low == rows["other"].ci_high == 0.5
    everything = rows["all"]
    assert everything.n == 6 and everything.win_rate == pytest.approx(3.6 / 6)
    assert everything.hard_win_rate == pytest.approx(4.5 / 6)


def test_baseline_refusal_rate_uses_the_threshold():
    rows = {r.category: r for r in summarize(ITEMS, EvalConfig(refusal_threshold=0.5))}
    assert rows["benign"].baseline_refusal_rate == pytest.approx(2 / 3)  # 0.9 and 0.7
    assert rows["benign"].policy_refusal_rate == 0.0


def test_report_dict_and_tables():
    config = EvalConfig()
    report = EvalReport(
        policy="/m/smollm2@adapter:/out/dpo/model",
        baseline="/m/smollm2@base",
        judge="/m/smollm2@base",
        constitution={"id": "default", "version": "1", "hash": "h"},
        config=config,
        items=ITEMS,
        categories=summarize(ITEMS, config),
    )
    data = json.loads(json.dumps(report.to_dict()))
    assert [c["category"] for c in data["categories"]] == ["red-team", "benign", "other", "all"]
    assert data["confidence_interval"]["method"] == "bootstrap"
    assert data["confidence_interval"]["resamples"] == 2000
    assert data["refusal"]["threshold"] == 0.4
    assert len(data["prompts"]) == 6
    for c in data["categories"]:
        assert c["ci_low"] <= c["win_rate"] <= c["ci_high"]
    console = Console(record=True, width=200)
    console.print(report_table(report))
    console.print(comparison_table([("before", report), ("after", report)]))
    text = console.export_text()
    assert "smollm2 + adapter dpo/model vs smollm2" in text
    assert "before" in text and "after" in text and text.count("red-team") == 3


def test_short_names():
    assert short_name("/m/smollm2@base") == "smollm2"
    assert short_name("org/model@v3") == "model@v3"
    assert short_name("/m/smollm2@adapter:/runs/x/model") == "smollm2 + adapter x/model"


def test_policy_spec():
    assert split_policy("default") == ("default", None)
    assert split_policy("default:/out/dpo/model") == ("default", "/out/dpo/model")
    assert split_policy("/models/m:/a") == ("/models/m", "/a")
    assert split_policy("org/name") == ("org/name", None)


def test_config_validation():
    from cai.errors import InvalidArgument

    with pytest.raises(InvalidArgument, match="refusal_threshold"):
        EvalConfig(refusal_threshold=1.5).validate()
    with pytest.raises(InvalidArgument, match="confidence"):
        EvalConfig(confidence=1.0).validate()
