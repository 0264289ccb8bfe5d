"""A smoke run of benchmarks/distributed.py at a tiny size (the tiny random model, two steps of
two pairs per variant), so a broken benchmark shows up in the tests. No figures are asserted."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.integration  # torchrun children


def test_distributed_benchmark_runs(tiny_model, tmp_path):
    from benchmarks import distributed

    out = tmp_path / "distributed.json"
    args = ["--model", tiny_model, "--steps", "2", "--global-batch", "2", "--out", str(out)]
    distributed.main(args)
    payload = json.loads(out.read_text())
    assert [row["processes"] for row in payload["rows"]] == [1, 1, 2, 2, 2, 2]
    assert all(row["global_batch"] == 2 and row["timed_steps"] == 1 for row in payload["rows"])
    # every rank reported its memory; FSDP2 holds a shard of what DDP holds whole
    ddp, fsdp = payload["rows"][4], payload["rows"][5]
    assert 0 < fsdp["optimizer_mb_per_rank"] < ddp["optimizer_mb_per_rank"]
