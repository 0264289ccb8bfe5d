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


async def test_prefix_cache_benchmark_runs(backend, default_model, results):
    from cai.backends.transformers import TransformersBackend

    off = TransformersBackend(default_model, device="cpu", dtype="float32", prefix_cache=False)
    await run.bench_prefix_cache(backend, off, pairs=2, rounds=1)
    await off.close()
    assert [r["prefix cache"] for r in rows(results, "prefix-cache")] == ["off", "on"]


async def test_exact_labels_benchmark_runs(default_model, results):
    await run.bench_exact_labels(default_model, pairs=2, answer_tokens=8)
    assert len(rows(results, "exact-labels")) == 2


async def test_ttft_benchmark_runs(backend, results):
    await run.bench_ttft(backend, running=1, max_new_tokens=8, rounds=1)
    assert [r["mode"] for r in rows(results, "ttft")] == ["continuous", "run to completion"]
    assert backend.continuous_batching  # the shared backend is left as it was


async def test_up_benchmark_runs(default_model, results):
    await run.bench_up(default_model, limit=1)
    saved = json.loads((results / "up.json").read_text())
    assert [r["prompts"] for r in saved["rows"]] == [1, 1]
    assert saved["records_identical"] is True  # greedy: the cache and the batching change no record
