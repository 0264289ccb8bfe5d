"""`TrainConfig`: every setting of `cai train`, documented in TRL's style.

The dataclass is the single source of truth: `cai train`'s flags, the YAML file's keys and the
table in docs/training.md are all generated from its fields and their `help` metadata.
"""

from __future__ import annotations

import difflib
import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from cai.errors import InvalidArgument, NotFound

Mode = Literal["sft", "dpo"]
SourceKind = Literal["file"]  # "kafka" and "memory" are planned (see trainer/data.py Source)
Scheduler = Literal["linear", "cosine", "constant"]
DType = Literal["auto", "float32", "bfloat16", "float16"]


@dataclass
class TrainConfig:
    """Settings of one training run. Unset fields keep these defaults."""

    model: str = field(
        default="default",
        metadata={"help": "'default' (SmolLM2-135M-Instruct), a local model folder, or a hub id."},
    )
    mode: Mode = field(
        default="dpo",
        metadata={
            "help": "sft: next-token loss on the final revisions (sft.jsonl); "
            "dpo: soft-label DPO on the judge's preferences (preferences.jsonl)."
        },
    )
    source: SourceKind = field(
        default="file",
        metadata={"help": "Where samples come from: 'file', a `cai up` run folder (Kafka is planned)."},
    )
    data: str | None = field(
        default=None,
        metadata={"help": "The `cai up` run folder to train on (required for source 'file')."},
    )
    output_dir: str = field(
        default="train-out",
        metadata={"help": "Folder for log.jsonl, the checkpoints and the final model; reruns resume here."},
    )
    lora: bool = field(
        default=True,
        metadata={
            "help": "Train a LoRA adapter (the reference is the base model, adapter off). "
            "False: full fine-tuning with a frozen copy of the model as reference (twice the weights)."
        },
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator (scale = alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        metadata={"help": "Module names that get adapters (comma-separated on the command line)."},
    )
    beta: float = field(
        default=0.1, metadata={"help": "DPO temperature: how far the policy may move from the reference."}
    )
    learning_rate: float = field(
        default=1e-4,
        metadata={"help": "Peak learning rate of AdamW (LoRA; full fine-tuning wants about 1e-6 to 5e-6)."},
    )
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    lr_scheduler: Scheduler = field(
        default="linear",
        metadata={"help": "Decay after warmup: linear or cosine to zero at the last step, or constant."},
    )
    warmup_steps: int = field(default=0, metadata={"help": "Optimizer steps of linear warmup from zero."})
    micro_batch_size: int = field(
        default=2, metadata={"help": "Samples (pairs in dpo) per forward/backward pass."}
    )
    gradient_accumulation_steps: int = field(
        default=1, metadata={"help": "Micro-batches per optimizer step."}
    )
    max_steps: int | None = field(
        default=None, metadata={"help": "Optimizer steps to train; overrides epochs when set."}
    )
    epochs: int = field(default=1, metadata={"help": "Passes over the data when max_steps is not set."})
    max_grad_norm: float = field(
        default=1.0, metadata={"help": "Clip the gradient to this global L2 norm (0: no clipping)."}
    )
    max_length: int = field(
        default=512,
        metadata={
            "help": "Tokens per sequence (prompt + completion). Longer prompts keep their last "
            "max_length/2 tokens, then the completion is cut at the end."
        },
    )
    seed: int = field(default=0, metadata={"help": "Seeds the data order, LoRA init and dropout."})
    checkpoint_every: int = field(
        default=50, metadata={"help": "Write a checkpoint every N optimizer steps (and at the end)."}
    )
    keep_checkpoints: int = field(default=2, metadata={"help": "Newest checkpoints to keep on disk."})
    log_every: int = field(default=1, metadata={"help": "Write a log.jsonl line every N optimizer steps."})
    device: str | None = field(default=None, metadata={"help": "torch device (default: cuda if present)."})
    dtype: DType = field(
        default="auto",
        metadata={
            "help": "Model weights' dtype; auto: bfloat16 on CUDA and on CPUs with native bf16, else float32."
        },
    )

    def __post_init__(self) -> None:
        self.validate()

    # ---- validation ---------------------------------------------------------------------

    def validate(self) -> None:
        """Check every field's type and range; the error names the field."""
        hints = _hints()
        for f in fields(self):
            setattr(self, f.name, _coerce(f.name, getattr(self, f.name), hints[f.name]))
        positive = ["lora_r", "lora_alpha", "micro_batch_size", "gradient_accumulation_steps", "epochs"]
        positive += ["max_length", "checkpoint_every", "keep_checkpoints", "log_every"]
        for name in positive:
            if getattr(self, name) < 1:
                raise InvalidArgument(f"{name}: must be at least 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise InvalidArgument(f"max_steps: must be at least 1, got {self.max_steps}")
        for name in ("beta", "learning_rate"):
            if not getattr(self, name) > 0:
                raise InvalidArgument(f"{name}: must be positive, got {getattr(self, name)}")
        for name in ("weight_decay", "max_grad_norm", "warmup_steps"):
            if getattr(self, name) < 0:
                raise InvalidArgument(f"{name}: must not be negative, got {getattr(self, name)}")
        if not 0 <= self.lora_dropout < 1:
            raise InvalidArgument(f"lora_dropout: must be in [0, 1), got {self.lora_dropout}")
        if not self.lora_target_modules:
            raise InvalidArgument("lora_target_modules: name at least one module")
        if self.max_length < 8:
            raise InvalidArgument(f"max_length: must be at least 8, got {self.max_length}")

    def check_ready(self) -> None:
        """What a run needs beyond valid values: the data folder and its file exist."""
        if self.data is None:
            raise InvalidArgument("data: give the `cai up` run folder to train on (--data DIR)")
        if not Path(self.data).is_dir():
            raise NotFound(f"data: {self.data} is not a folder")
        if not self.data_file.is_file():
            raise NotFound(f"data: {self.data} has no {self.data_file.name} (needed for mode {self.mode})")

    @property
    def data_file(self) -> Path:
        return Path(self.data or ".") / ("sft.jsonl" if self.mode == "sft" else "preferences.jsonl")

    @property
    def samples_per_step(self) -> int:
        return self.micro_batch_size * self.gradient_accumulation_steps

    # ---- construction -------------------------------------------------------------------

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str = "config") -> TrainConfig:
        known = [f.name for f in fields(cls)]
        for key in values:
            if key not in known:
                close = difflib.get_close_matches(str(key), known, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise InvalidArgument(f"{where}: unknown key {key!r}{hint}")
        try:
            return cls(**values)
        except InvalidArgument as exc:
            raise InvalidArgument(f"{where}: {exc}") from None

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
        """Read a YAML mapping of field names; `overrides` (set CLI flags) win over the file."""
        path = Path(path)
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise NotFound(f"--config: cannot read {path}: {exc.strerror}") from exc
        except yaml.YAMLError as exc:
            raise InvalidArgument(f"{path}: invalid YAML: {exc}") from exc
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise InvalidArgument(f"{path}: expected a mapping of setting names to values")
        return cls.from_dict({**loaded, **(overrides or {})}, where=str(path))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _hints() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


def _type_name(hint: Any) -> str:
    origin = get_origin(hint)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(hint))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(hint))
    if origin is list:
        return f"list[{_type_name(get_args(hint)[0])}]"
    return "null" if hint is type(None) else getattr(hint, "__name__", str(hint))


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """`value` as the field's type, or an InvalidArgument naming the field and the expected type."""
    origin = get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in get_args(hint):
            return None
        (inner,) = [a for a in get_args(hint) if a is not type(None)]
        try:
            return _coerce(name, value, inner)
        except InvalidArgument:
            raise InvalidArgument(f"{name}: expected {_type_name(hint)}, got {value!r}") from None
    if origin is Literal:
        if value in get_args(hint):
            return value
    elif origin is list:
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
            return list(value)
    elif hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, Path):
            return str(value)
    raise InvalidArgument(f"{name}: expected {_type_name(hint)}, got {value!r}")


def field_docs() -> list[tuple[str, str, str, str]]:
    """(name, type, default, help) of every field, for the CLI and the docs."""
    hints = _hints()
    rows = []
    for f in fields(TrainConfig):
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        shown = ",".join(default) if isinstance(default, list) else default
        shown = "-" if shown is None else str(shown)
        rows.append((f.name, _type_name(hints[f.name]), shown, f.metadata["help"]))
    return rows


def markdown_table() -> str:
    """The settings table of docs/training.md; a test keeps the two equal."""
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for name, type_name, default, help_text in field_docs():
        escaped = type_name.replace("|", "\\|")  # a bare | would split the table cell
        lines.append(f"| `{name}` | {escaped} | `{default}` | {help_text} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown_table())  # the table for docs/training.md
