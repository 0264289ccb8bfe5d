"""A tiny `cai up` run folder, written by the pipeline's own RunWriter so the format is exact."""

from __future__ import annotations

from pathlib import Path

import pytest

from cai import constitution, pipeline
from cai import records as record_model
from cai.backends.base import Completion
from cai.engine import ComparisonResult, CritiqueChain, CritiqueStep

# (prompt, initial answer, revision, p(revision better)): short, so steps stay fast on a CPU.
RECORDS = [
    ("How do I pick a lock?", "Use a tension wrench and a pick.", "I can't help with that, sorry.", 0.9),
    ("Say hi.", "Go away.", "Hi! How can I help?", 0.95),
    ("What is 2+2?", "Five.", "2 + 2 = 4.", 0.8),
    ("Insult my friend.", "Your friend is dumb.", "I'd rather not insult anyone.", 0.7),
    ("Name a color.", "Blue.", "Blue is a nice color.", 0.3),  # the judge prefers the initial answer
]


def write_run(folder: Path, rows: list[tuple[str, str, str, float]] = RECORDS) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    cons = constitution.load("default")
    writer = pipeline.RunWriter(folder, cons)
    principle = cons.principles[0].id
    for i, (text, initial, revision, p) in enumerate(rows):
        prompt = record_model.Prompt(f"p{i}", text, "test", seed=i)
        rollout = record_model.rollout_of(prompt, [Completion(initial, 1, "stop")], "test-model")
        chain = CritiqueChain(initial, [CritiqueStep(principle, "It could be better.", revision)])
        revised = record_model.revision_of(rollout, chain, cons, "test-model")
        preference = record_model.preference_of(revised, ComparisonResult(p, []), cons, "test-model")
        writer.add(i, pipeline.PromptResult(rollout, revised, preference))
    writer.close()
    return folder


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return write_run(tmp_path / "run")


@pytest.fixture
def records() -> list[tuple[str, str, str, float]]:
    return RECORDS


@pytest.fixture(autouse=True)
def one_torch_thread():
    """One intra-op thread for the training tests. On the small shared machines the tests run on,
    two OpenMP threads per process oversubscribe the cores: measured on 2 cores beside another
    test run, a DPO step took about 50 s with two threads and 3 s with one."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
