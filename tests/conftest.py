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


@pytest.fixture(scope="session")
def tiny_model(default_model, tmp_path_factory) -> str:
    """A randomly initialised two-layer model with the default model's tokenizer and chat template.
    For the tests about delivery, checkpoints and weight swaps, where what the model says does not
    matter but every step and restart has to be quick."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path_factory.mktemp("tiny-model")
    config = AutoConfig.from_pretrained(default_model)
    config.update(
        {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
    )
    config.update({"num_key_value_heads": 2, "head_dim": 8})
    import torch

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(default_model).save_pretrained(folder)
    return str(folder)
