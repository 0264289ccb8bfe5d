"""TrainConfig: YAML, overrides, errors that name the key, the docs tables, the CLI's error line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cai.errors import InvalidArgument, NotFound
from trainer.config import SECTIONS, TrainConfig, markdown_table

DOCS = Path(__file__).parents[2] / "docs" / "training.md"


def test_yaml_and_overrides(write_yaml):
    path = write_yaml("mode: sft\nlearning_rate: 1\nlora_target_modules: [q_proj]\nmax_steps: 3\n")
    config = TrainConfig.from_yaml(path, {"max_steps": 7, "lora_target_modules": "q_proj, v_proj"})
    assert config.mode == "sft"
    assert config.learning_rate == 1.0 and isinstance(config.learning_rate, float)
    assert config.max_steps == 7  # the flag wins
    assert config.lora_target_modules == ["q_proj", "v_proj"]
    assert config.beta == 0.1  # untouched default


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("micro_batch_sise: 4\n", "unknown key 'micro_batch_sise' (did you mean 'micro_batch_size'?)"),
        ("mode: ppo\n", "mode: expected 'sft' | 'dpo' | 'online-dpo', got 'ppo'"),
        ("beta: high\n", "beta: expected float, got 'high'"),
        ("lora: 1\n", "lora: expected bool, got 1"),
        ("micro_batch_size: 0\n", "micro_batch_size: must be at least 1, got 0"),
        ("lora_dropout: 1.5\n", "lora_dropout: must be in [0, 1)"),
        ("max_steps: 2.5\n", "max_steps: expected int | null, got 2.5"),
        ("source: s3\n", "source: expected 'file' | 'kafka' | 'memory', got 's3'"),
        ("learning_rate: 1e-4\n", "learning_rate: expected float, got '1e-4'"),  # a string to YAML
        ("max_staleness: -1\n", "max_staleness: must not be negative, got -1"),
        ("beta: 0\n", "beta: must be positive, got 0"),
        ("- a list\n", "expected a mapping"),
    ],
)
def test_bad_yaml_names_the_key(write_yaml, text, message):
    path = write_yaml(text)
    with pytest.raises(InvalidArgument) as info:
        TrainConfig.from_yaml(path)
    assert str(info.value).startswith(str(path))
    assert message in str(info.value)


def test_missing_data(tmp_path):
    with pytest.raises(InvalidArgument, match="data: give the"):
        TrainConfig().check_ready()
    with pytest.raises(NotFound, match=r"has no sft\.jsonl"):
        TrainConfig(mode="sft", data=str(tmp_path)).check_ready()


def test_docs_tables_match_the_models():
    assert markdown_table() in DOCS.read_text(), "regenerate the tables: python -m trainer.config"


def test_the_sections_hold_every_setting_once():
    names = [name for _, section in SECTIONS for name in section.model_fields]
    assert names == list(TrainConfig.model_fields)
    assert TrainConfig(beta=0.5, publish_every=3).to_dict()["beta"] == 0.5  # flat keys


def test_python_callers_get_the_same_errors():
    with pytest.raises(InvalidArgument, match=r"^micro_batch_size: must be at least 1, got 0$"):
        TrainConfig(micro_batch_size=0)
    with pytest.raises(InvalidArgument, match=r"^unknown key 'bta' \(did you mean 'beta'\?\)$"):
        TrainConfig(bta=0.2)
    assert TrainConfig(data=Path("runs/x")).data == "runs/x"


def test_cli_reports_a_bad_key_in_one_line(write_yaml, tmp_path):
    path = write_yaml("learning_rat: 0.1\n")
    result = subprocess.run(
        [sys.executable, "-m", "cli.main", "train", "--config", str(path), "--data", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    expected = f"error: {path}: unknown key 'learning_rat' (did you mean 'learning_rate'?)"
    assert result.stderr.strip() == expected


def test_learning_rate_schedule():
    from trainer.train import lr_factor

    linear = lr_factor(TrainConfig(warmup_steps=2, lr_scheduler="linear"), total_steps=6)
    assert [round(linear(done), 3) for done in range(6)] == [0.333, 0.667, 1.0, 0.75, 0.5, 0.25]
    cosine = lr_factor(TrainConfig(lr_scheduler="cosine"), total_steps=4)
    assert [round(cosine(done), 3) for done in range(4)] == [1.0, 0.854, 0.5, 0.146]
    constant = lr_factor(TrainConfig(warmup_steps=1, lr_scheduler="constant"), total_steps=4)
    assert [constant(done) for done in range(4)] == [0.5, 1.0, 1.0, 1.0]
