"""A smoke run of benchmarks/trainer_vs_trl.py at a tiny size (the tiny random model, one step of
two pairs a side), so a broken benchmark shows up in the tests. No figures are asserted."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.integration  # TRL, and the default model's tokenizer


def test_trainer_vs_trl_benchmark_runs(tiny_model, tmp_path):
    from benchmarks import trainer_vs_trl

    out = tmp_path / "trainer-vs-trl.json"
    args = ["--model", tiny_model, "--steps", "1", "--warmup", "0", "--rounds", "1"]
    args += ["--micro-batch", "2", "--device", "cpu", "--dtype", "float32", "--out", str(out)]
    trainer_vs_trl.main(args)
    payload = json.loads(out.read_text())
    assert [row["variant"] for row in payload["rows"]] == ["ours", "TRL"]
    assert {"time ratio ours/TRL", "memory ratio ours/TRL"} <= set(payload)
