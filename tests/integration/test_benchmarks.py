"""Smoke runs of the engine benchmarks at tiny sizes, so a broken benchmark shows up in the tests.

No figures are asserted (speed is what the benchmarks measure, not what tests check); each run
must finish and write its table's JSON, here into a temporary folder instead of
benchmarks/results/.
"""

import json

import pytest

from benchmarks import run

pytestmark = pytest.mark.integration


@pytest.fixture
def results(tmp_path, monkeypatch):
    monkeypatch.setattr(run, "RESULTS", tmp_path)
    return tmp_path


def rows(results, name):
    return json.loads((results / f"{name}.json").read_text())["rows"]


async def test_batching_benchmark_runs(backend, results):
    await run.bench_batching(backend, requests=2, max_new_tokens=4)
    assert [r["mode"] for r in rows(results, "batching")] == ["sequential", "concurrent (dynamic batching)"]


async def test_judging_benchmark_runs(backend, results):
    await run.bench_judging(backend, pairs=2, answer_tokens=8, rationale_tokens=8)
    assert len(rows(results, "judging")) == 3
