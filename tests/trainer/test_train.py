"""Training on the real default model: the loss falls, SIGTERM and resume are exact, a damaged
checkpoint is skipped, and `cai train` runs end to end."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from trainer.config import TrainConfig
from trainer.io import build_trainer
from trainer.train import StepResult, evaluate_loss

pytestmark = pytest.mark.integration


def make_config(run_dir: Path, out: Path, **overrides) -> TrainConfig:
    values = {
        "data": str(run_dir),
        "output_dir": str(out),
        "device": "cpu",
        "dtype": "float32",  # exact numbers for the resume comparison
        "learning_rate": 2e-3,  # large, so a few steps show
        "max_steps": 4,
        "checkpoint_every": 2,
        "keep_checkpoints": 3,
        **overrides,
    }
    return TrainConfig.from_dict(values)


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_dpo_lowers_the_loss_and_trains_the_adapter(default_model, run_dir, tmp_path):
    trainer = build_trainer(make_config(run_dir, tmp_path / "out", mode="dpo", micro_batch_size=2))
    samples = trainer.source.samples
    before = evaluate_loss(trainer, samples)
    assert before == pytest.approx(0.6931, abs=1e-3)  # LoRA starts as the identity: d = 0
    result = trainer.train()
    after = evaluate_loss(trainer, samples)
    assert after < before - 0.05, (before, after)
    assert result.steps == 4 and not result.stopped and result.samples == 8
    log = read_log(tmp_path / "out")
    assert [row["step"] for row in log] == [1, 2, 3, 4]
    assert {"loss", "margin", "accuracy", "kl", "lr", "grad_norm", "samples_per_s"} <= set(log[0])
    # the adapter moved between checkpoints, and away from its zero-initialised B matrices
    early = load_file(tmp_path / "out" / "checkpoint-2" / "adapter.safetensors")
    late = load_file(tmp_path / "out" / "checkpoint-4" / "adapter.safetensors")
    assert any(not torch.equal(early[k], late[k]) for k in early)
    exported = load_file(result.model_dir / "adapter_model.safetensors")
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in exported.items())


def test_sft_lowers_the_loss_and_skips_a_repeated_sample(default_model, run_dir, tmp_path, caplog):
    data = run_dir / "sft.jsonl"
    lines = data.read_text().splitlines()
    data.write_text("\n".join([*lines, lines[1]]) + "\n")  # the same sample id twice
    trainer = build_trainer(
        make_config(run_dir, tmp_path / "out", mode="sft", micro_batch_size=2, max_steps=3)
    )
    samples = trainer.source.samples
    before = evaluate_loss(trainer, samples)
    with caplog.at_level(logging.WARNING, logger="cai.trainer"):
        result = trainer.train()
    after = evaluate_loss(trainer, samples)
    assert after < before - 0.2, (before, after)
    # 6 samples: epoch 0's five distinct ones (its repeat skipped), then one of epoch 1
    assert result.samples == 6 and result.duplicates == 1
    assert "sample id already trained" in caplog.text and "sft.jsonl:" in caplog.text


def test_sigterm_then_resume_equals_a_straight_run(default_model, run_dir, tmp_path, caplog):
    # dropout, warmup and decay on: the RNG and scheduler states must come back too
    options = {
        "mode": "dpo",
        "micro_batch_size": 1,
        "gradient_accumulation_steps": 2,
        "lora_dropout": 0.1,
        "warmup_steps": 1,
        "lr_scheduler": "cosine",
    }
    straight_ids: list[list[str]] = []
    build_trainer(make_config(run_dir, tmp_path / "a", **options)).train(
        lambda s: straight_ids.append(s.sample_ids)
    )

    def stop_after_two(step: StepResult) -> None:
        if step.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # as Kubernetes stops a pod

    config = make_config(run_dir, tmp_path / "b", **options)
    first = build_trainer(config).train(stop_after_two)
    assert first.stopped and first.steps == 2 and first.model_dir is None
    assert sorted(p.name for p in (tmp_path / "b").glob("checkpoint-*")) == ["checkpoint-2"]
    del first

    resumed = build_trainer(config)  # a fresh trainer, as a restarted process would build
    assert resumed.resumed_from == 2
    result = resumed.train()
    assert result.steps == 4 and result.samples == 4

    assert [row["sample_ids"] for row in read_log(tmp_path / "b")] == straight_ids
    losses_a = [row["loss"] for row in read_log(tmp_path / "a")]
    losses_b = [row["loss"] for row in read_log(tmp_path / "b")]
    assert losses_b == pytest.approx(losses_a, rel=1e-5)
    a = load_file(tmp_path / "a" / "checkpoint-4" / "adapter.safetensors")
    b = load_file(tmp_path / "b" / "checkpoint-4" / "adapter.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-7)

    # a truncated newest checkpoint: skipped with a warning, the previous one is used
    newest = tmp_path / "b" / "checkpoint-4"
    with (newest / "adapter.safetensors").open("r+b") as f:
        f.truncate(100)
    with caplog.at_level(logging.WARNING, logger="cai.trainer"):
        fallback = build_trainer(config)
    assert fallback.resumed_from == 2
    assert f"skipping checkpoint {newest}: adapter.safetensors does not match its checksum" in caplog.text
    assert [row["step"] for row in read_log(tmp_path / "b")] == [1, 2]  # steps 3-4 will be redone


def test_cli_trains_and_prints_a_summary(default_model, run_dir, tmp_path):
    out = tmp_path / "out"
    result = subprocess.run(
        [
            *(sys.executable, "-m", "cli.main", "train", "--mode", "dpo", "--data", str(run_dir)),
            *("--output-dir", str(out), "--max-steps", "1", "--micro-batch-size", "1"),
            *("--dtype", "float32", "--device", "cpu", "--no-lora", "--learning-rate", "1e-6"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1"},  # see one_torch_thread
    )
    assert result.returncode == 0, result.stderr
    assert "cai train summary (dpo)" in result.stdout and "full fine-tuning" in result.stdout
    assert (out / "checkpoint-1" / "model.safetensors").is_file()
    assert (out / "model" / "model.safetensors").is_file()
    (row,) = read_log(out)
    # full fine-tuning keeps a frozen copy as the reference: before the update they are equal
    assert row["step"] == 1 and row["margin"] == 0 and row["loss"] == pytest.approx(0.693147, abs=1e-5)
