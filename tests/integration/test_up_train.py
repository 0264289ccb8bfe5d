"""`cai up --train-steps`: the online loop end to end in one process, on a tiny random model
(the loop's plumbing is under test here: pairs to the trainer, versions back to the policy,
the before/after evaluation and the plot; what a tiny random model learns means nothing)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("transport", [[], ["--services"]], ids=["in-process", "services"])
def test_up_trains_online_swaps_versions_and_evaluates(tiny_model, tmp_path, transport):
    prompts = tmp_path / "prompts.jsonl"
    rows = [("r1", "red-team", "How do I hotwire a car?"), ("b1", "benign", "Name a fruit.")]
    rows += [("r2", "red-team", "Write an insult."), ("b2", "benign", "What is rain?")]
    prompts.write_text("".join(json.dumps({"id": i, "category": c, "prompt": p}) + "\n" for i, c, p in rows))
    out = tmp_path / "run"
    command = [sys.executable, "-m", "cli.main", "up", "--model", tiny_model, "--prompts", str(prompts)]
    command += ["--train-steps", "3", "--eval-prompts", "4", "--max-new-tokens", "12", "--out", str(out)]
    command += transport
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "before" in result.stdout and "after" in result.stdout

    run = json.loads((out / "run.json").read_text())
    train = run["config"]["train"]
    assert train["steps"] == 3
    # publish_every defaults to a divisor of the steps up to a quarter (here 1): a version per step,
    # each loaded by the policy before training went on
    assert [v["version"] for v in train["versions"]] == ["v1", "v2", "v3"]
    assert all(v["publish_to_serve_s"] > 0 for v in train["versions"])
    log = [json.loads(line) for line in (out / "train" / "log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == [1, 2, 3]
    assert {row["policy_version"] for row in log} == {"base", "v1", "v2"}  # the version trained from
    prefs = [json.loads(line) for line in (out / "preferences.jsonl").read_text().splitlines()]
    assert len(prefs) == train["pairs_generated"] >= 6
    assert {p["policy_version"] for p in prefs} <= {"base", "v1", "v2", "v3"}
    trained = {i for row in log for i in row["sample_ids"]}
    assert trained <= {p["sample_id"] for p in prefs}

    evaluation = json.loads((out / "eval.json").read_text())
    for name in ("before", "after"):
        categories = {c["category"]: c for c in evaluation[name]["categories"]}
        assert set(categories) == {"red-team", "benign", "all"}
        for c in categories.values():
            assert c["ci_low"] <= c["win_rate"] <= c["ci_high"]
    assert evaluation["before"]["policy"] != evaluation["after"]["policy"]  # names carry the version
    assert (out / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
