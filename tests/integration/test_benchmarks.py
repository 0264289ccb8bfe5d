"""Smoke runs of the benchmarks at tiny sizes, so a broken benchmark shows up in the tests.

No figures are asserted (speed is what the benchmarks measure, not what tests check); each run
must finish and produce its table's rows (benchmarks.run's write their JSON, here into a
temporary folder instead of benchmarks/results/). trainer_vs_trl's and distributed's smoke runs
are in tests/trainer; langchain-peer needs the `bench` extra, which `make test` does not install,
and trainer_gpu a GPU.
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
    saved = json.loads((results / "up-float32.json").read_text())
    assert [r["prompts"] for r in saved["rows"]] == [1, 1]
    assert saved["records_identical"] is True  # greedy: the cache and the batching change no record


def test_memory_benchmark_runs(results):
    run.bench_memory(limit=1)
    default, float32 = rows(results, "memory")
    assert "--dtype auto" in default["command"] and "--dtype float32" in float32["command"]


def test_service_benchmarks_run(backend):
    import asyncio

    from benchmarks import services

    overhead = services.bench_service_overhead(concurrency=2, duration_s=0.5, warmup_calls=10)
    assert len(overhead["rows"]) == 2 and overhead["rows"][0]["errors"] == 0
    paths = asyncio.run(
        services.bench_grpc_vs_inprocess(backend, requests=2, concurrency=2, max_new_tokens=4, rounds=1)
    )
    assert {r["path"] for r in paths["rows"]} >= {"CAIEngine.critique (in-process)"}


def test_kafka_benchmarks_run(backend):
    from benchmarks import kafka

    assert kafka.bench_ceiling(records=20, in_flight=[4])["rows"]
    assert kafka.bench_latency(rate=5.0, seconds=1.0)["rows"]
    assert len(kafka.bench_vs_inprocess(backend, prompts=1, rounds=1)["rows"]) == 3


def test_online_benchmarks_run(tiny_model):
    import asyncio

    from benchmarks import online

    served = asyncio.run(online.publish_to_serve(tiny_model, versions=1, device="cpu", dtype="float32"))
    assert [r["load"] for r in served["rows"]] == ["idle", "4 callers"]
    loop = online.online_loop(tiny_model, steps=1, limit=1, rounds=1, device="cpu", dtype="float32")
    assert [r["variant"] for r in loop["rows"]] == ["overlapped", "synchronous"]


def test_vllm_gpu_benchmark_without_vllm_measures_our_side(tiny_model, tmp_path):
    """No vLLM or GPU here: the GPU check says so and runs publish-to-serve-vllm on the stand-in."""
    from benchmarks import vllm_gpu

    result = vllm_gpu.main(["--model", tiny_model, "--versions", "1", "--out", str(tmp_path)])
    assert result["vllm"].startswith("not run: ")
    served = result["publish-to-serve"]
    assert served["benchmark"] == "publish-to-serve-vllm"
    assert [(r["load"], r["version"]) for r in served["rows"]] == [("idle", "v1"), ("4 callers", "v2")]
    assert json.loads((tmp_path / "vllm-gpu.json").read_text())["vllm"] == result["vllm"]
