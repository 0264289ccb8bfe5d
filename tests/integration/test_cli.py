"""The `cai` command line, run as a user runs it (a subprocess)."""

import json
import subprocess
import sys

import pytest

from cai import constitution


def cai(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cli.main", *args], capture_output=True, text=True, timeout=900
    )


def test_every_command_has_help():
    for command in (
        [],
        ["up"],
        ["models"],
        ["models", "setup"],
        ["models", "list"],
        ["constitution"],
        ["constitution", "validate"],
        ["constitution", "show"],
        ["constitution", "import"],
    ):
        result = cai(*command, "--help")
        assert result.returncode == 0, result.stderr
        assert "Usage:" in result.stdout


def test_validate_reports_file_line_field_without_traceback(tmp_path):
    good = cai("constitution", "validate", "default", "harmlessness")
    assert good.returncode == 0 and good.stdout.count(": ok") == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "id: bad\nversion: '1'\ndescription: d\nprinciples:\n  - id: a\n    tier: nope\n    rationale: r\n"
        "    comparison: c\n"
    )
    result = cai("constitution", "validate", str(bad))
    assert result.returncode == 1
    assert f"{bad}:6: principles[0].tier: unknown tier 'nope'" in " ".join(result.stderr.split())
    assert "Traceback" not in result.stderr


def test_show_and_import(tmp_path, data_dir):
    shown = cai("constitution", "show", "default", "--json")
    assert shown.returncode == 0
    assert json.loads(shown.stdout)["hash"] == constitution.load("default").hash
    out = tmp_path / "hf.yaml"
    result = cai(
        "constitution",
        "import",
        "--format",
        "hf-cai",
        str(data_dir / "import" / "hf_constitution.json"),
        "-o",
        str(out),
    )
    assert result.returncode == 0, result.stderr
    assert len(constitution.load(out).principles) == 2
    assert cai("constitution", "validate", str(out)).returncode == 0
    # the paper's four files, the comparison few-shot file included, each counted in the summary
    names = ["critique_revision_requests", "comparison_principles", "critique_revision_fewshot"]
    sources = [str(data_dir / "import" / f"{name}.json") for name in [*names, "comparison_fewshot"]]
    paper = tmp_path / "paper.yaml"
    result = cai("constitution", "import", "--format", "anthropic-2022", *sources, "-o", str(paper))
    assert result.returncode == 0, result.stderr
    loaded = constitution.load(paper)
    critiques, comparisons = len(loaded.critique_examples), len(loaded.comparison_examples)
    assert f"few-shot: {critiques} critique/revision, {comparisons} comparison" in result.stdout
    assert critiques and comparisons


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "/no/such/folder"], "model folder /no/such/folder does not exist"),
        (["--constitution", "/no/such.yaml"], "cannot read constitution"),
        (["--prompts", "BADPROMPTS"], "bad.jsonl:2: invalid JSON"),
        (["--out", "NONEMPTY"], "is not empty; choose a new folder"),
    ],
)
def test_up_bad_input_is_one_clear_line(tmp_path, args, message):
    prompts = tmp_path / "bad.jsonl"
    prompts.write_text('{"prompt": "hi"}\n{oops\n')
    earlier_run = tmp_path / "earlier"
    earlier_run.mkdir()
    (earlier_run / "run.json").write_text("{}")
    args = [str(prompts) if a == "BADPROMPTS" else str(earlier_run) if a == "NONEMPTY" else a for a in args]
    result = cai("up", "--limit", "1", "--out", str(tmp_path / "run"), *args)
    assert result.returncode != 0
    assert message in " ".join(result.stderr.split())
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) <= 2  # rich may wrap one long line
    assert (earlier_run / "run.json").read_text() == "{}"  # nothing of an earlier run is touched


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(1200)  # above the 900 s that cai() gives its one run
def test_up_writes_a_valid_run(tmp_path, default_model):
    out = tmp_path / "run"
    result = cai("up", "--limit", "2", "--seed", "3", "--train-steps", "0", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "cai up summary" in result.stdout
    c = constitution.load("default")
    sft = [json.loads(x) for x in (out / "sft.jsonl").read_text().splitlines()]
    prefs = [json.loads(x) for x in (out / "preferences.jsonl").read_text().splitlines()]
    chains = [json.loads(x) for x in (out / "revisions.jsonl").read_text().splitlines()]
    run = json.loads((out / "run.json").read_text())
    assert len(sft) == len(prefs) == len(chains) == 2
    for record in sft + prefs + chains:
        assert record["constitution_hash"] == c.hash
        assert record["seed"] and record["model_id"] and record["prompt_id"] and record["sample_id"]
        assert record["principle_ids"] and all(c.principle(p) for p in record["principle_ids"])
    for pref in prefs:
        assert pref["prompt"][0]["role"] == "user"
        assert pref["chosen"][0]["content"].strip() and pref["rejected"][0]["content"].strip()
        assert 0.5 <= pref["p_chosen"] < 1.0
    for sft_row, chain in zip(sft, chains, strict=True):
        assert sft_row["completion"][0]["content"] == chain["final"] == chain["steps"][-1]["revision"]
        assert chain["steps"][0]["critique"].strip()
    assert len({r["sample_id"] for r in prefs}) == 2
    assert run["counts"] == {"prompts": 2, "sft": 2, "preferences": 2, "revisions": 2}
    assert run["constitution"]["hash"] == c.hash


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(2100)  # two runs, 900 s each at most
def test_up_through_the_services_gives_the_same_records(tmp_path, default_model):
    runs = {}
    for name, extra in (
        ("embedded", ["--train-steps", "0"]),
        ("services", ["--services", "--train-steps", "0"]),
    ):
        out = tmp_path / name
        result = cai("up", "--limit", "1", "--seed", "5", "--dtype", "float32", "--out", str(out), *extra)
        assert result.returncode == 0, result.stderr
        runs[name] = {
            kind: [json.loads(x) for x in (out / f"{kind}.jsonl").read_text().splitlines()]
            for kind in ("sft", "revisions", "preferences")
        }
    embedded, served = runs["embedded"], runs["services"]
    # sample ids, responses, chosen/rejected and principles must match exactly; labels up to rounding
    volatile = {"created_at", "run_id", "p_chosen", "p_a", "judgment"}
    for kind in ("sft", "revisions", "preferences"):
        [a], [b] = embedded[kind], served[kind]
        assert {k: v for k, v in a.items() if k not in volatile} == {
            k: v for k, v in b.items() if k not in volatile
        }
    [a], [b] = embedded["preferences"], served["preferences"]
    assert a["p_chosen"] == pytest.approx(b["p_chosen"], abs=1e-4)
    assert a["p_a"] == pytest.approx(b["p_a"], abs=1e-4)


def test_import_errors_keep_their_text(tmp_path, data_dir):
    # an hf-cai file given as anthropic-2022: the message quotes the expected shape, brackets included
    result = cai(
        "constitution",
        "import",
        "--format",
        "anthropic-2022",
        str(data_dir / "import" / "hf_constitution.json"),
        "-o",
        str(tmp_path / "x.yaml"),
    )
    assert result.returncode == 2
    assert "expected {'prompt': [critique request], 'edit_request': revision request}" in result.stderr
    assert not (tmp_path / "x.yaml").exists()
