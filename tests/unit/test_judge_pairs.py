"""Judge quality: pair files, the figures on known labels, and scripted judges (no model)."""

import json
import re
from collections import Counter

import pytest

from cai import constitution
from cai.backends.fake import FakeBackend
from cai.errors import InvalidArgument
from cai.judge_quality import (
    UNINFORMATIVE,
    builtin_pairs_file,
    group_quality,
    judge_quality,
    load_pairs,
    plot_reliability,
    reliability,
    report_table,
)


def test_builtin_pairs_cover_four_kinds_of_mistake():
    pairs = load_pairs()
    assert len(pairs) >= 60
    counts = Counter(p.category for p in pairs)
    assert set(counts) == {"harm", "needless-refusal", "lecturing", "honesty"}
    assert min(counts.values()) >= 15
    assert len({p.id for p in pairs}) == len(pairs)
    assert all(p.better != p.worse and p.conversation[-1]["role"] == "user" for p in pairs)
    assert str(pairs[0].where) == f"{builtin_pairs_file()}:1"
    few = load_pairs(limit=6)  # taken in turn from each category
    kinds = ["harm", "needless-refusal", "lecturing", "honesty"]
    assert [p.category for p in few] == [*kinds, "harm", "needless-refusal"]


def test_hhh_format_reads_the_conversation_and_the_right_option(data_dir):
    pairs = load_pairs(data_dir / "judge" / "hhh_sample.jsonl")
    assert [p.category for p in pairs] == ["hhh"] * 3
    first, second, third = pairs
    assert first.conversation == [{"role": "user", "content": "How do I stop my bike chain from squeaking?"}]
    assert first.better.startswith("Clean the chain") and first.worse.startswith("I can't advise")
    assert second.better.startswith("Please don't") and second.worse.startswith("Yes, a few")  # (B) right
    assert [m["role"] for m in third.conversation] == ["user", "assistant", "user"]
    assert third.conversation[-1]["content"] == "Is the tap water safe to drink there?"
    assert "[[[" not in third.better and "]]]" not in third.worse


def test_our_format_with_defaults(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(
        '{"prompt": "q", "better": "good", "worse": "bad"}\n\n{"id": "x", "prompt": "q2", '
        '"better": "b", "worse": "w", "category": "c"}\n'
    )
    first, second = load_pairs(path)
    assert (first.id, first.category, first.where) == ("line-1", "uncategorized", f"{path}:1")
    assert (second.id, second.category, second.where) == ("x", "c", f"{path}:3")
    assert len(load_pairs(path, limit=1)) == 1


HHH = "\n\nHuman: hi?\n\n\nWhich is better? Options:\n (A) [[[one]]]\n (B) [[[two]]]\n\nThe answer is:"


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"prompt": "q", "better": "b"}, ":2: worse: must be a non-empty string"),
        ({"prompt": "q", "better": "", "worse": "w"}, ":2: better: must be a non-empty string"),
        ({"prompt": 3, "better": "b", "worse": "w"}, ":2: prompt: must be a non-empty string"),
        ({"question": "q"}, ":2: expected 'prompt', 'better' and 'worse'"),
        ({"prompt": "Human: hi", "corrects": [" (A)"], "incorrects": [" (B)"]}, "no 'Options:' line"),
        ({"prompt": HHH, "corrects": " (A)", "incorrects": [" (B)"]}, ":2: corrects: expected a list"),
        ({"prompt": HHH, "corrects": [" (C)"], "incorrects": [" (B)"]}, ":2: corrects: ' (C)' is not"),
        ({"prompt": HHH, "corrects": [" (A)"], "incorrects": [" (A)"]}, "names the same option"),
        (
            {"prompt": HHH.replace("Human:", "Someone:"), "corrects": [" (A)"], "incorrects": [" (B)"]},
            ":2: prompt: no 'Human:' turn",
        ),
        ({"id": "line-1", "prompt": "q", "better": "b", "worse": "w"}, ":2: id: 'line-1' repeats line 1"),
    ],
)
def test_bad_lines_name_the_file_line_and_field(tmp_path, row, message):
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"prompt": "q", "better": "b", "worse": "w"}\n' + json.dumps(row) + "\n")
    with pytest.raises(
        InvalidArgument, match=re.escape(f"{path}{message}" if message[0] == ":" else message)
    ):
        load_pairs(path)


def test_an_empty_file_is_an_error(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    with pytest.raises(InvalidArgument, match="holds no pairs"):
        load_pairs(path)


def test_figures_on_known_labels():
    # (p_right, p with the better answer first, p with it second)
    labels = [(0.9, 0.95, 0.85), (0.7, 0.9, 0.5), (0.5, 0.3, 0.7), (0.2, 0.1, 0.3)]
    g = group_quality("all", "all", labels)
    assert g.n == 4
    assert g.accuracy == pytest.approx((1 + 1 + 0.5 + 0) / 4)  # a tie counts half
    assert g.mean_p_right == pytest.approx(0.575)
    # agree: both above 0.5, and both below; exactly 0.5 and opposite sides do not
    assert g.position_consistency == pytest.approx(2 / 4)
    assert g.uninformative == pytest.approx(1 / 4)
    without_second = group_quality("all", "all", [(0.9, 0.9, None)])
    assert without_second.position_consistency is None


def test_reliability_bins_and_ece():
    # confidences 0.55 (right), 0.55 (wrong), 0.95 (right) x2
    bins, ece = reliability([0.55, 0.45, 0.95, 0.95])
    assert [b.n for b in bins] == [2, 0, 0, 0, 2]
    assert bins[0].confidence == pytest.approx(0.55) and bins[0].accuracy == pytest.approx(0.5)
    assert bins[4].accuracy == 1.0
    assert ece == pytest.approx(0.5 * 0.05 + 0.5 * 0.05)
    _, perfect = reliability([1.0, 0.0 + 1.0])  # confidence 1, always right
    assert perfect == 0.0
    assert reliability([0.5])[0][0].n == 1  # a tie lands in the first bin


class ContentJudge(FakeBackend):
    """Prefers whichever option of the last question holds `marker`."""

    def __init__(self, marker: str):
        super().__init__()
        self.marker = marker

    async def score_options(self, prompt, options):
        question = prompt.rsplit("Options:", 1)[1]
        first = question.split("(B)", 1)[0]
        a_good = self.marker in first
        return [-0.1, -2.0] if a_good else [-2.0, -0.1]


class FirstOptionJudge(FakeBackend):
    async def score_options(self, prompt, options):
        return [-0.5, -1.5]


def pairs_file(tmp_path, n=6):
    path = tmp_path / "pairs.jsonl"
    rows = [
        {
            "id": f"p{i}",
            "category": "a" if i % 3 else "b",
            "prompt": f"question {i}?",
            "better": f"GOOD answer {i}",
            "worse": f"poor answer {i}",
        }
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


async def test_a_judge_that_reads_the_answers_is_right_and_consistent(tmp_path):
    pairs = load_pairs(pairs_file(tmp_path))
    report = await judge_quality(ContentJudge("GOOD"), constitution.load("default"), pairs)
    overall = report.overall
    p = 1 / (1 + pow(2.718281828459045, -1.9))  # the option probability of logp -0.1 against -2.0
    assert overall.accuracy == 1.0 and overall.mean_p_right == pytest.approx(p, abs=1e-6)
    assert overall.position_consistency == 1.0 and overall.uninformative == 0.0
    assert [g.group for g in report.groups if g.kind == "category"] == ["a", "b"]
    principles = [g for g in report.groups if g.kind == "principle"]
    assert sum(g.n for g in principles) == 6  # one drawn principle per pair
    assert report.warnings() == []


async def test_a_judge_that_follows_positions_teaches_nothing(tmp_path):
    pairs = load_pairs(pairs_file(tmp_path))
    cons = constitution.load("default")
    report = await judge_quality(FirstOptionJudge(), cons, pairs)
    overall = report.overall
    assert overall.mean_p_right == pytest.approx(0.5) and overall.uninformative == 1.0
    assert overall.position_consistency == 0.0 and overall.accuracy == 0.5
    warnings = " ".join(report.warnings())
    assert "teach the trainer nothing" in warnings and "positions" in warnings and "coin" in warnings
    # One ordering only: better and worse answers take turns as (A), so position bias is not accuracy.
    from cai.engine import JudgeOptions

    one_order = await judge_quality(FirstOptionJudge(), cons, pairs, JudgeOptions(debias=False))
    assert one_order.overall.accuracy == 0.5 and one_order.overall.position_consistency is None
    assert one_order.overall.uninformative == 0.0  # confident, and wrong half the time
    assert one_order.overall.ece > 0.2
    # Every principle on every pair
    names = tuple(p.id for p in cons.comparison_principles)
    every = await judge_quality(ContentJudge("GOOD"), cons, pairs[:2], JudgeOptions(principles=names))
    principles = [g for g in every.groups if g.kind == "principle"]
    assert len(principles) == len(names) and all(g.n == 2 and g.accuracy == 1.0 for g in principles)


async def test_report_json_table_and_plot(tmp_path):
    pairs = load_pairs(pairs_file(tmp_path))
    report = await judge_quality(ContentJudge("GOOD"), constitution.load("default"), pairs, seed=3)
    data = json.loads(json.dumps(report.to_dict()))
    assert data["groups"][0]["group"] == "all" and len(data["pairs"]) == 6
    assert data["pairs"][0]["verdicts"][0]["p_right"] > 0.5
    assert str(UNINFORMATIVE) in data["definitions"]["uninformative"]
    from rich.console import Console

    console = Console(width=200, record=True)
    console.print(report_table(report))
    assert "both orders agree" in console.export_text()
    png = tmp_path / "r.png"
    plot_reliability(report, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
