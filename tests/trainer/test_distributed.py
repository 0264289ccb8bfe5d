"""`cai train` under torchrun on CPU (gloo, 2 processes, the tiny random model; the default model
once): the same global batch gives the same weights on 2 ranks as in one process, FSDP2 the same
losses as DDP, a resumed 2-rank run continues where it stopped, and a checkpoint of another world
size is refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.trainer.conftest import RECORDS
from trainer.distributed import share

pytestmark = pytest.mark.integration

STEPS = 3


def run_train(out: Path, data: Path, model: str, nproc: int, *extra: str) -> subprocess.CompletedProcess[str]:
    """`cai train` on the run folder: in one process, or under torchrun with `nproc`; the global
    batch is 2 pairs either way (micro-batches of 2 in one process, of 1 on each of 2 ranks)."""
    train = [
        "-m", "cli.main", "train", "--mode", "dpo", "--data", str(data), "--model", model,
        "--output-dir", str(out), "--micro-batch-size", str(2 // nproc), "--device", "cpu",
        "--dtype", "float32", "--lora-target-modules", "q_proj,v_proj", "--lora-dropout", "0",
        "--lr-scheduler", "constant", "--learning-rate", "0.01", "--checkpoint-every", "1",
        "--keep-checkpoints", "5", *extra,
    ]  # fmt: skip
    torchrun = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    launcher = torchrun if nproc > 1 else []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path.cwd())}
    return subprocess.run(
        [sys.executable, *launcher, *train], env=env, capture_output=True, text=True, timeout=300
    )


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def steps(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def adapter(out: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(out / f"checkpoint-{step}" / "adapter.safetensors")


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.fixture(scope="module")
def runs(tiny_model, tmp_path_factory) -> dict[str, Path]:
    """One process for 3 steps; 2 DDP ranks for 2 steps, then resumed to 3; 2 FSDP2 ranks."""
    from tests.trainer.conftest import write_run

    root = tmp_path_factory.mktemp("distributed")
    data = write_run(root / "data")
    single, ddp, fsdp = root / "single", root / "ddp", root / "fsdp2"
    ok(run_train(single, data, tiny_model, 1, "--max-steps", str(STEPS)))
    ok(run_train(ddp, data, tiny_model, 2, "--max-steps", str(STEPS - 1)))
    stopped = adapter(ddp, STEPS - 1)
    resumed = ok(run_train(ddp, data, tiny_model, 2, "--max-steps", str(STEPS)))
    assert "resumed at step 2" in " ".join(resumed.stdout.split())
    assert_same_weights(adapter(ddp, STEPS - 1), stopped)  # the resume left checkpoint 2 alone
    ok(run_train(fsdp, data, tiny_model, 2, "--max-steps", str(STEPS), "--distributed", "fsdp2"))
    return {"data": data, "single": single, "ddp": ddp, "fsdp2": fsdp}


def test_share_splits_a_step_into_contiguous_blocks():
    assert [list(share(4, r, 2)) for r in range(2)] == [[0, 1], [2, 3]]
    assert [list(share(3, r, 2)) for r in range(2)] == [[0, 1], [2]]
    assert [list(share(1, r, 3)) for r in range(3)] == [[0], [], []]


def test_ddp_on_two_ranks_equals_one_process_on_the_same_global_batch(runs):
    single, ddp = steps(runs["single"]), steps(runs["ddp"])
    assert [s["step"] for s in ddp] == list(range(1, STEPS + 1))
    # the same samples in each step: rank 0 read them and split them, nothing lost or repeated
    assert [s["sample_ids"] for s in ddp] == [s["sample_ids"] for s in single]
    assert all(len(s["sample_ids"]) == 2 for s in ddp)
    for a, b in zip(single, ddp, strict=True):
        for key in ("loss", "margin", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-7), key
    for step in range(1, STEPS + 1):
        assert_same_weights(adapter(runs["single"], step), adapter(runs["ddp"], step))
    state = json.loads((runs["ddp"] / f"checkpoint-{STEPS}" / "state.json").read_text())
    assert state["world_size"] == 2 and state["fsdp2"] is False
    position = state["source_state"]  # rank 0's: where the whole job is in the run folder
    assert position["epoch"] * position["samples"] + position["index"] == 2 * STEPS
    assert (runs["ddp"] / "model" / "adapter_model.safetensors").is_file()


def test_fsdp2_gives_the_losses_and_weights_of_ddp(runs):
    ddp, fsdp = steps(runs["ddp"]), steps(runs["fsdp2"])
    assert [s["sample_ids"] for s in fsdp] == [s["sample_ids"] for s in ddp]
    for a, b in zip(ddp, fsdp, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-7)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4, abs=1e-7)
    # rank 0 gathered the shards into the same adapter file as DDP writes
    assert_same_weights(adapter(runs["ddp"], STEPS), adapter(runs["fsdp2"], STEPS))
    state = json.loads((runs["fsdp2"] / f"checkpoint-{STEPS}" / "state.json").read_text())
    assert state["fsdp2"] is True


def test_the_log_records_the_label_signal_of_each_step(runs):
    p = {f"p{i}": row[3] for i, row in enumerate(RECORDS)}
    labels = {}
    for line in (runs["data"] / "preferences.jsonl").read_text().splitlines():
        row = json.loads(line)
        labels[row["sample_id"]] = row["p_chosen"]
    assert len(labels) == len(p)
    for row in steps(runs["single"]):
        expected = sum(abs(labels[i] - 0.5) for i in row["sample_ids"]) / len(row["sample_ids"])
        assert row["label_signal"] == pytest.approx(expected)


def test_a_checkpoint_of_another_world_size_is_refused(runs, tiny_model):
    result = run_train(runs["ddp"], runs["data"], tiny_model, 1, "--max-steps", str(STEPS + 1))
    assert result.returncode != 0
    message = " ".join((result.stdout + result.stderr).split())
    assert "world_size" in message and "2 process(es) and this one has 1" in message
    assert not (runs["ddp"] / f"checkpoint-{STEPS + 1}").exists()


def test_ddp_on_the_default_model_equals_one_process(default_model, tmp_path):
    """Once on the real model (its tokenizer and chat template, all its layers): one step of 2 DDP
    ranks gives the weights of one process on the same global batch."""
    from tests.trainer.conftest import write_run

    data = write_run(tmp_path / "data")
    ok(run_train(tmp_path / "single", data, default_model, 1, "--max-steps", "1"))
    ok(run_train(tmp_path / "ddp", data, default_model, 2, "--max-steps", "1"))
    single, ddp = steps(tmp_path / "single"), steps(tmp_path / "ddp")
    assert [s["sample_ids"] for s in ddp] == [s["sample_ids"] for s in single]
    for key in ("loss", "grad_norm"):  # the gradient averaged over the ranks is the whole batch's
        assert ddp[0][key] == pytest.approx(single[0][key], rel=1e-5), key
    # AdamW's first step divides each gradient element by its own size, so the few elements whose
    # gradient is at float32 rounding level (summed in another order on 2 ranks) may move by up
    # to the learning rate either way; every other element moves the same.
    a, b = adapter(tmp_path / "single", 1), adapter(tmp_path / "ddp", 1)
    assert a.keys() == b.keys() and a
    differ = sum(int(((a[k] - b[k]).abs() > 1e-6).sum()) for k in a)
    assert differ <= 1e-3 * sum(t.numel() for t in a.values()), differ
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 0.01  # the learning rate
