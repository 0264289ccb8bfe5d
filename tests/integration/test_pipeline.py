"""The `cai up` pipeline in process, on the real default model."""

import asyncio
import json
import time

import pytest

from cai import constitution, pipeline
from cai.backends.base import SamplingParams
from cai.engine import CAIEngine, CritiqueOptions, EngineConfig, JudgeOptions

pytestmark = pytest.mark.integration


SHORT = SamplingParams(max_new_tokens=24, temperature=0.8)


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def engine(backend):
    """The real model with short generations, to keep the runs quick."""
    return CAIEngine(
        backend, constitution.load("default"), EngineConfig(critique_params=SHORT, revision_params=SHORT)
    )


async def test_samples_mode_is_rl_cai_and_the_same_seed_repeats_the_run(engine, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"id": "q1", "prompt": "How do I keep basil fresh?", "category": "benign"}\n')
    records = pipeline.load_prompts(prompts)

    def config(out):
        return pipeline.RunConfig(
            out=out,
            prompts=prompts,
            critique=CritiqueOptions(rounds=2),
            seed=5,
            pairs="samples",
            judge=JudgeOptions(k_principles=2),
            response_params=SHORT,
        )

    first = await pipeline.run(pipeline.LocalStages(engine), config(tmp_path / "a"), records)
    await pipeline.run(pipeline.LocalStages(engine), config(tmp_path / "b"), records)
    assert first["counts"]["preferences"] == 1
    [pref] = read(tmp_path / "a" / "preferences.jsonl")
    [chain] = read(tmp_path / "a" / "revisions.jsonl")
    # RL-CAI: the pair is two sampled answers; the critique chain revises the first of them
    assert {pref["chosen"][0]["content"], pref["rejected"][0]["content"]} != {
        chain["initial"],
        chain["final"],
    }
    assert chain["initial"] in (pref["chosen"][0]["content"], pref["rejected"][0]["content"])
    assert pref["chosen_is_revision"] is None
    assert len(chain["steps"]) == 2 and len(pref["principle_ids"]) == 2
    # same seed, same prompts: the same ids, principles, samples and critiques, and the same labels
    # up to float rounding (the second run reuses prefix states the first one computed)
    for name in ("sft.jsonl", "revisions.jsonl", "preferences.jsonl"):
        a, b = read(tmp_path / "a" / name), read(tmp_path / "b" / name)
        labels = []
        for row in a + b:
            row.pop("created_at"), row.pop("run_id")
            labels.append([row.pop(k, None) for k in ("p_chosen", "p_a")])
            for label in row.pop("judgment", []):
                labels[-1] += [label["p_a"], label["p_first_ab"]]
        assert a == b, name
        half = len(labels) // 2
        for x, y in zip(labels[:half], labels[half:], strict=True):
            assert x == pytest.approx(y, abs=1e-5), name


async def test_an_interrupted_run_keeps_the_prompts_it_finished(engine, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"id": "short", "prompt": "Say hi."}\n{"id": "long", "prompt": "Tell a story."}\n')
    records = pipeline.load_prompts(prompts)
    config = pipeline.RunConfig(
        out=tmp_path / "run", prompts=prompts, seed=1, concurrency=1, response_params=SHORT
    )
    run = asyncio.ensure_future(pipeline.run(pipeline.LocalStages(engine), config, records))
    sft = tmp_path / "run" / "sft.jsonl"
    deadline = time.monotonic() + 300
    while not (sft.exists() and sft.read_text()):
        assert not run.done(), f"the run ended before writing sft.jsonl: {run.exception()!r}"
        assert time.monotonic() < deadline, "waited 300 s for the first row of sft.jsonl"
        await asyncio.sleep(0.2)
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    [row] = read(sft)  # concurrency 1: the second prompt had not finished
    assert row["prompt_id"] == "short"
    assert len(read(tmp_path / "run" / "preferences.jsonl")) == 1
    assert not (tmp_path / "run" / "run.json").exists()
