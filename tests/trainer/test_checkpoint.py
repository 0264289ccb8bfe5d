"""Atomic checkpoints: the manifest, falling back past a damaged one, pruning."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from trainer.checkpoint import latest_valid, prune, verify, write_checkpoint


def fill(text: str):
    def write(folder: Path) -> None:
        (folder / "weights.bin").write_bytes(text.encode() * 100)
        (folder / "sub").mkdir()
        (folder / "sub" / "state.json").write_text("{}")

    return write


def test_truncated_newest_is_skipped_with_a_warning(tmp_path, caplog):
    write_checkpoint(tmp_path, 2, fill("two"))
    newest = write_checkpoint(tmp_path, 4, fill("four"))
    assert verify(newest) is None
    assert latest_valid(tmp_path) == newest
    with (newest / "weights.bin").open("r+b") as f:
        f.truncate(10)
    with caplog.at_level(logging.WARNING, logger="cai.trainer"):
        assert latest_valid(tmp_path) == tmp_path / "checkpoint-2"
    assert f"skipping checkpoint {newest}: weights.bin does not match its checksum" in caplog.text


def test_missing_file_or_manifest(tmp_path, caplog):
    write_checkpoint(tmp_path, 1, fill("one"))
    second = write_checkpoint(tmp_path, 2, fill("two"))
    (second / "sub" / "state.json").unlink()
    assert verify(second) == "sub/state.json is missing"
    third = write_checkpoint(tmp_path, 3, fill("three"))
    (third / "complete.json").unlink()
    assert "no readable complete.json" in str(verify(third))
    with caplog.at_level(logging.WARNING, logger="cai.trainer"):
        assert latest_valid(tmp_path) == tmp_path / "checkpoint-1"
    assert "checkpoint-3" in caplog.text and "checkpoint-2" in caplog.text


def test_interrupted_write_leaves_no_checkpoint(tmp_path):
    def crash(folder: Path) -> None:
        (folder / "weights.bin").write_text("half")
        raise KeyboardInterrupt

    write_checkpoint(tmp_path, 1, fill("one"))
    with contextlib.suppress(KeyboardInterrupt):
        write_checkpoint(tmp_path, 2, crash)
    assert (tmp_path / "checkpoint-2.tmp").is_dir() and not (tmp_path / "checkpoint-2").exists()
    assert latest_valid(tmp_path) == tmp_path / "checkpoint-1"
    prune(tmp_path, keep=5)
    assert not (tmp_path / "checkpoint-2.tmp").exists()


def test_prune_keeps_the_newest(tmp_path):
    for step in (1, 2, 10, 11):
        write_checkpoint(tmp_path, step, fill(str(step)))
    prune(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-10", "checkpoint-11"]
