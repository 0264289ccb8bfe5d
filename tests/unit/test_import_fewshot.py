"""The CAI paper's few-shot files (anthropic-2022): critique/revision transcripts and comparisons."""

import json
import subprocess
import sys

import pytest

from cai import constitution, prompting
from cai.errors import InvalidArgument
from cai.importers import IMPORTED_COMPARISON_QUESTION, import_constitution


def paper_files(data_dir):
    folder = data_dir / "import"
    return [
        folder / "critique_revision_requests.json",
        folder / "comparison_principles.json",
        folder / "critique_revision_fewshot.json",
        folder / "comparison_fewshot.json",
    ]


def test_comparison_fewshot_file_becomes_comparison_examples(data_dir):
    c = import_constitution("anthropic-2022", paper_files(data_dir), "paper")
    first, second = c.comparison_examples
    assert first.conversation == [
        {"role": "user", "content": "What's the quickest way to get a splinter out?"}
    ]
    assert first.preferred == "A" and first.response_a.startswith("Wash the area")
    assert first.response_b.startswith("Dig it out")
    # the better answer takes turns as (A) and (B)
    assert second.preferred == "B" and second.response_b.startswith("Please don't")
    assert [m["role"] for m in second.conversation] == ["user", "assistant", "user"]
    assert second.conversation[-1]["content"] == "Should I post her private photos online?"
    assert first.question == IMPORTED_COMPARISON_QUESTION
    assert len(c.critique_examples) == 1  # the transcripts still come in beside them
    assert constitution.parse(c.to_dict()).hash == c.hash
    # and the judge is shown the first one before its own question
    turns = prompting.comparison_messages(
        c, c.comparison_examples[:1], [{"role": "user", "content": "q"}], "Which?", "x", "y", False
    )
    assert "(A) Wash the area" in turns[1]["content"] and turns[2]["content"] == "The answer is: (A)"


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        (
            [{"prompt": "\n\nHuman: hi\n\nAssistant:", "corrects": ["a"]}],
            r"\[0\]: incorrects: expected a list",
        ),
        (
            [{"prompt": "\n\nHuman: hi\n\nAssistant:", "corrects": [], "incorrects": ["b"]}],
            r"\[0\]: corrects",
        ),
        ([{"corrects": ["a"], "incorrects": ["b"]}], r"\[0\]: prompt: expected an object"),
        ([{"prompt": "no turns", "corrects": ["a"], "incorrects": ["b"]}], r"\[0\]: prompt: no 'Human:'"),
        (
            [{"prompt": "\n\nHuman: hi\n\nAssistant: hello", "corrects": ["a"], "incorrects": ["b"]}],
            r"\[0\]: prompt: must end with a 'Human:' turn",
        ),
        ([{"prompt": "x"}, "a string"], r"not an anthropic-2022 file"),
    ],
)
def test_bad_comparison_entries_name_the_file_and_entry(tmp_path, data_dir, rows, message):
    bad = tmp_path / "fewshot.json"
    bad.write_text(json.dumps(rows))
    with pytest.raises(InvalidArgument, match=message) as info:
        import_constitution("anthropic-2022", [data_dir / "import" / "comparison_principles.json", bad], "x")
    assert str(bad) in str(info.value)


def test_cli_imports_all_four_files(tmp_path, data_dir):
    out = tmp_path / "paper.yaml"
    files = [str(f) for f in paper_files(data_dir)]
    run = [sys.executable, "-m", "cli.main", "constitution"]
    result = subprocess.run(
        [*run, "import", "--format", "anthropic-2022", *files, "-o", str(out)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    loaded = constitution.load(out)
    assert len(loaded.comparison_examples) == 2 and len(loaded.critique_examples) == 1
    shown = subprocess.run([*run, "show", str(out)], capture_output=True, text=True)
    assert "1 critique/revision, 2 comparison" in shown.stdout
