"""Reading JSONL files whose every line must be a JSON object, with errors naming FILE:LINE."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cai.errors import InvalidArgument, NotFound


def read_objects(path: Path, what: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line; `what` names the option or setting that gave
    the file, for the error when it cannot be read."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise NotFound(f"{what}: cannot read {path}: {exc.strerror}") from exc
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InvalidArgument(f"{where}: invalid JSON: {exc.msg}") from exc
        if not isinstance(row, dict):
            raise InvalidArgument(f"{where}: expected a JSON object")
        yield number, row
