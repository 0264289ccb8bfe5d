import json

import pytest

from cai.errors import InvalidArgument, NotFound
from cai.pipeline import load_prompts
from cai.records import prompt_seed


def test_builtin_prompt_set():
    records = load_prompts(None)
    categories = [r.category for r in records]
    assert categories.count("red-team") >= 40 and categories.count("benign") >= 40
    assert len({r.id for r in records}) == len(records)
    assert len(load_prompts(None, limit=5)) == 5


def test_bad_line_is_reported_with_its_number(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a"}\n\n{"prompt": "b"\n{"prompt": "c"}\n')
    with pytest.raises(InvalidArgument, match=r"p.jsonl:3: invalid JSON"):
        load_prompts(path)
    path.write_text('{"prompt": "a"}\n{"text": "b"}\n')
    with pytest.raises(InvalidArgument, match=r"p.jsonl:2: prompt: must be a non-empty string"):
        load_prompts(path)
    path.write_text('{"id": "x", "prompt": "a"}\n{"id": "x", "prompt": "b"}\n')
    with pytest.raises(InvalidArgument, match=r"p.jsonl:2: id: 'x' repeats line 1"):
        load_prompts(path)
    with pytest.raises(NotFound):
        load_prompts(tmp_path / "missing.jsonl")


def test_ids_default_to_line_numbers(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": p}) for p in ["a", "b"]) + "\n")
    assert [r.id for r in load_prompts(path)] == ["line-1", "line-2"]


def test_prompt_seed_is_stable_and_distinct():
    # Pinned values: the seed must be the same in every process and every version, because sample
    # ids and the seeds on Kafka prompt records are derived from it: a run repeated with the same
    # --seed, here or on another machine, must give the same records. A hash() based seed would
    # change with PYTHONHASHSEED and fail here.
    assert prompt_seed(0, "a") == 845039730
    assert prompt_seed(0, "b") == 2049525150
    assert prompt_seed(1, "a") == 3579708452
    assert prompt_seed(3, "q1") == 606438711
    assert prompt_seed(0, "a") != prompt_seed(0, "b")
    assert prompt_seed(0, "a") != prompt_seed(1, "a")
