"""Every benchmark module imports against the current code, so a renamed function cannot break a
benchmark unnoticed. (peer_langchain needs the `bench` extra, which `make test` does not install.)"""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

MODULES = sorted(
    p.stem
    for p in (Path(__file__).parents[2] / "benchmarks").glob("*.py")
    if p.stem not in ("__init__", "peer_langchain")
)


@pytest.mark.parametrize("name", MODULES)
def test_benchmark_module_imports(name):
    importlib.import_module(f"benchmarks.{name}")
