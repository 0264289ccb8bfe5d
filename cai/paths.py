"""Where the project keeps its cache, models and built-in data."""

import os
from pathlib import Path

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
PACKAGE_DIR = Path(__file__).resolve().parent


def cai_home() -> Path:
    """`$CAI_HOME`, else `$XDG_CACHE_HOME/cai`, else `~/.cache/cai`."""
    if home := os.environ.get("CAI_HOME"):
        return Path(home).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "cai"


def models_dir() -> Path:
    return cai_home() / "models"


def default_model_dir() -> Path:
    return models_dir() / DEFAULT_MODEL_NAME


def builtin_constitutions_dir() -> Path:
    # A wheel ships them inside the package; a source checkout keeps them at the top level.
    packaged = PACKAGE_DIR / "constitutions"
    return packaged if packaged.is_dir() else PACKAGE_DIR.parent / "constitutions"


def builtin_prompts_file() -> Path:
    return PACKAGE_DIR / "data" / "prompts.jsonl"
