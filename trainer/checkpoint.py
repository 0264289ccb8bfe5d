"""Atomic, verifiable checkpoints.

A checkpoint is written into `checkpoint-<step>.tmp/`; its manifest `complete.json`, holding
the sha256 of every other file, is written last, then the folder is renamed to
`checkpoint-<step>/`. A crash leaves either a `.tmp` folder (ignored and removed) or a complete
checkpoint; a file damaged later fails its checksum, and resuming falls back to the previous one.
Everything a resume needs is in one folder: weights, optimizer and scheduler, RNG states, the
step, the source position and the de-duplication state, so they always agree.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("cai.trainer")

MANIFEST = "complete.json"
_NAME = re.compile(r"checkpoint-(\d+)")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_checkpoint(output_dir: Path, step: int, write: Callable[[Path], None]) -> Path:
    """Let `write` fill a staging folder, seal it with the manifest and rename it into place."""
    final = output_dir / f"checkpoint-{step}"
    staging = output_dir / f"checkpoint-{step}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    write(staging)
    files = sorted(p for p in staging.rglob("*") if p.is_file())
    manifest = {"step": step, "files": {str(p.relative_to(staging)): _sha256(p) for p in files}}
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    for p in [*files, staging / MANIFEST]:
        _fsync(p)  # the data is on disk before the rename makes the checkpoint visible
    if final.exists():
        # Only a checkpoint that failed verification, from a run this one resumed before, can
        # be here: this step is being written again.
        shutil.rmtree(final)
    os.rename(staging, final)
    _fsync(output_dir)
    return final


def verify(folder: Path) -> str | None:
    """None if the folder is a complete checkpoint whose files match its manifest, else why not."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        expected: dict[str, str] = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"no readable {MANIFEST} (an interrupted write)"
    for name, digest in expected.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if _sha256(path) != digest:
            return f"{name} does not match its checksum (truncated or changed)"
    return None


def checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """The `checkpoint-<step>` folders, newest first (complete or not)."""
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if (m := _NAME.fullmatch(p.name))]
    return sorted(found, reverse=True)


def latest_valid(output_dir: Path) -> Path | None:
    """The newest checkpoint that verifies; each newer one that does not is named in a warning."""
    for _, folder in checkpoints(output_dir):
        problem = verify(folder)
        if problem is None:
            return folder
        log.warning("skipping checkpoint %s: %s", folder, problem)
    return None


def prune(output_dir: Path, keep: int) -> None:
    """Keep the newest `keep` checkpoints; drop older ones and staging leftovers."""
    for _, folder in checkpoints(output_dir)[keep:]:
        shutil.rmtree(folder, ignore_errors=True)
    for leftover in output_dir.glob("checkpoint-*.tmp"):
        shutil.rmtree(leftover, ignore_errors=True)


# ---- RNG states ---------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
