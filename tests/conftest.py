"""Shared fixtures. Integration tests need the default model prepared by `cai models setup`."""

from __future__ import annotations

from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"


@pytest.fixture
def data_dir() -> Path:
    return DATA


@pytest.fixture
def write_yaml(tmp_path: Path):
    def write(text: str, name: str = "c.yaml") -> Path:
        path = tmp_path / name
        path.write_text(text)
        return path

    return write


@pytest.fixture(scope="session")
def default_model() -> str:
    """The real default model (SmolLM2-135M-Instruct), prepared once if needed."""
    from cai.models import setup_default_model

    return str(setup_default_model(progress=lambda _: None))


@pytest.fixture(scope="session")
def backend(default_model):
    """One float32 backend for the session: exact numbers for the label identities."""
    from cai.backends.transformers import TransformersBackend

    return TransformersBackend(default_model, device="cpu", dtype="float32")
