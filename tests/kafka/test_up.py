"""`cai up --kafka` on a real broker and the real default model: the stages run as stream stages,
and the run folder they are exported into matches the in-process run's."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from cai.kafka.admin import pipeline_status

KINDS = ("sft", "revisions", "preferences")


def cai(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cli.main", *args], capture_output=True, text=True, timeout=900
    )


def records(out) -> dict[str, list[dict]]:
    return {kind: [json.loads(x) for x in (out / f"{kind}.jsonl").read_text().splitlines()] for kind in KINDS}


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(2100)  # two runs, 900 s each at most
@pytest.mark.parametrize("pairs", ["revision", "samples"])
def test_up_through_kafka_gives_the_same_records(tmp_path, default_model, kafka_broker, pairs):
    common = [
        "up",
        "--limit",
        "2",
        "--seed",
        "3",
        "--dtype",
        "float32",
        "--pairs",
        pairs,
        "--train-steps",
        "0",
    ]
    embedded = cai(*common, "--out", str(tmp_path / "embedded"))
    assert embedded.returncode == 0, embedded.stderr
    streamed = cai(*common, "--out", str(tmp_path / "kafka"), "--kafka", kafka_broker.bootstrap)
    assert streamed.returncode == 0, streamed.stderr
    a, b = records(tmp_path / "embedded"), records(tmp_path / "kafka")
    # sample ids, responses, chosen/rejected and principles must match exactly; labels up to rounding
    volatile = {"created_at", "run_id", "p_chosen", "p_a", "judgment"}
    for kind in KINDS:
        assert len(a[kind]) == len(b[kind]) == 2
        for x, y in zip(a[kind], b[kind], strict=True):
            assert {k: v for k, v in x.items() if k not in volatile} == {
                k: v for k, v in y.items() if k not in volatile
            }
    for x, y in zip(a["preferences"], b["preferences"], strict=True):
        assert x["p_chosen"] == pytest.approx(y["p_chosen"], abs=1e-4)
        assert x["p_a"] == pytest.approx(y["p_a"], abs=1e-4)
    run = json.loads((tmp_path / "kafka" / "run.json").read_text())
    assert run["counts"]["preferences"] == 2 and run["config"]["transport"] == "kafka"
    # Every stage committed all it consumed, and nothing was dead-lettered.
    status = pipeline_status(kafka_broker.bootstrap, prefix=run["config"]["kafka_topic_prefix"], window=0)
    consumed = [p for p in status.lags if p.committed is not None]  # the trainer's group has not run
    assert {p.group.rsplit(".", 1)[-1] for p in consumed} == {"cai-policy", "cai-critique", "cai-judge"}
    assert all(p.lag == 0 for p in consumed)
    assert all(not t.dead_letters for t in status.topics)
