import pytest

from cai.errors import NotFound
from cai.models import DEFAULT_MODEL, resolve_model


def test_resolve_model(tmp_path, monkeypatch):
    monkeypatch.setenv("CAI_HOME", str(tmp_path / "home"))
    with pytest.raises(NotFound, match="cai models setup"):
        resolve_model(DEFAULT_MODEL)
    folder = tmp_path / "my-model"
    folder.mkdir()
    with pytest.raises(NotFound, match="not a Hugging Face model folder"):
        resolve_model(str(folder))
    (folder / "config.json").write_text("{}")
    assert resolve_model(str(folder)) == str(folder)
    with pytest.raises(NotFound, match="does not exist"):
        resolve_model(str(tmp_path / "missing"))
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
