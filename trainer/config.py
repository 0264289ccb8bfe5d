"""`TrainConfig`: every setting of `cai train`, as pydantic models like the services' settings.

The settings are split by concern, as TRL splits its configs (`TrainingArguments`, then what
`DPOConfig` adds): `TrainingSettings` is what every run uses; `SourceSettings` says where the
samples come from; `DPOSettings` is what the dpo modes add; `OnlineSettings` is what online-dpo
adds (staleness and publishing policy versions). `TrainConfig` is all of them in one flat model,
so the YAML keys and the flags stay one flat namespace: `beta: 0.2`, `--publish-every 5`.

The models are the single source of truth: `cai train`'s flags, the YAML file's keys and the
tables in docs/training.md are all generated from their fields and descriptions (`SECTIONS`).
Values are checked strictly, as a YAML file is written (an int is not a bool, 2.5 is not an int);
every error is an InvalidArgument that names the setting.
"""

from __future__ import annotations

import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails

from cai.errors import InvalidArgument, NotFound

Mode = Literal["sft", "dpo", "online-dpo"]
SourceKind = Literal["file", "kafka", "memory"]
Scheduler = Literal["linear", "cosine", "constant"]
DType = Literal["auto", "float32", "bfloat16", "float16"]
Distributed = Literal["ddp", "fsdp2"]


class _Section(BaseModel):
    # strict: YAML already gives typed values; "1e-4" (a string to YAML) or 2.5 steps are errors
    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _paths_as_strings(cls, values: Any) -> Any:
        """Folders may be given as Paths (from Python); they are kept as strings."""
        if isinstance(values, dict):
            return {k: str(v) if isinstance(v, Path) else v for k, v in values.items()}
        return values


class TrainingSettings(_Section):
    """What every run uses: the model, LoRA, the optimizer and schedule, checkpoints and logs."""

    model: str = Field(
        "default", description="'default' (SmolLM2-135M-Instruct), a local model folder, or a hub id."
    )
    mode: Mode = Field(
        "dpo",
        description="sft: next-token loss on the final revisions; dpo: soft-label DPO on the "
        "judge's preferences; online-dpo: dpo on a stream whose pairs the policy in service "
        "keeps generating, publishing a new policy version every publish_every steps.",
    )
    output_dir: str = Field(
        "train-out",
        description="Folder for log.jsonl, the checkpoints and the final model; reruns resume here.",
    )
    lora: bool = Field(
        True,
        description="Train a LoRA adapter (the reference is the base model, adapter off). "
        "False: full fine-tuning with a frozen copy of the model as reference (twice the weights).",
    )
    lora_r: int = Field(16, ge=1, description="LoRA rank.")
    lora_alpha: int = Field(32, ge=1, description="LoRA scaling numerator (scale = alpha / r).")
    lora_dropout: float = Field(0.05, description="Dropout on the LoRA input.")
    lora_target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        description="Module names that get adapters (comma-separated on the command line).",
    )
    learning_rate: float = Field(
        1e-4,
        gt=0,
        description="Peak learning rate of AdamW (LoRA; full fine-tuning wants about 1e-6 to 5e-6).",
    )
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    lr_scheduler: Scheduler = Field(
        "linear", description="Decay after warmup: linear or cosine to zero at the last step, or constant."
    )
    warmup_steps: int = Field(0, ge=0, description="Optimizer steps of linear warmup from zero.")
    micro_batch_size: int = Field(2, ge=1, description="Samples (pairs in dpo) per forward/backward pass.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    max_steps: int | None = Field(
        None, ge=1, description="Optimizer steps to train; overrides epochs when set."
    )
    epochs: int = Field(1, ge=1, description="Passes over the data when max_steps is not set.")
    max_grad_norm: float = Field(
        1.0, ge=0, description="Clip the gradient to this global L2 norm (0: no clipping)."
    )
    max_length: int = Field(
        512,
        ge=8,
        description="Tokens per sequence (prompt + completion). Longer prompts keep their last "
        "max_length/2 tokens, then the completion is cut at the end.",
    )
    seed: int = Field(0, description="Seeds the data order, LoRA init and dropout.")
    checkpoint_every: int = Field(
        50, ge=1, description="Write a checkpoint every N optimizer steps (and at the end)."
    )
    keep_checkpoints: int = Field(2, ge=1, description="Newest checkpoints to keep on disk.")
    log_every: int = Field(1, ge=1, description="Write a log.jsonl line every N optimizer steps.")
    device: str | None = Field(None, description="torch device (default: cuda if present).")
    dtype: DType = Field(
        "auto",
        description="Model weights' dtype; auto: bfloat16 on CUDA and on CPUs with native bf16, "
        "else float32.",
    )
    distributed: Distributed = Field(
        "ddp",
        description="Under torchrun: ddp (each process holds the whole model, gradients averaged) or "
        "fsdp2 (weights, gradients and optimizer state sharded over the processes, for models that "
        "do not fit one device). A single process ignores it.",
    )

    @field_validator("lora_target_modules", mode="before")
    @classmethod
    def _module_list(cls, value: Any) -> Any:
        if isinstance(value, str):  # from the command line
            return [part.strip() for part in value.split(",") if part.strip()]
        return list(value) if isinstance(value, tuple) else value

    @field_validator("lora_target_modules")
    @classmethod
    def _some_modules(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("name at least one module")
        return value

    @field_validator("lora_dropout")
    @classmethod
    def _dropout(cls, value: float) -> float:
        if not 0 <= value < 1:
            raise ValueError(f"must be in [0, 1), got {value}")
        return value

    @property
    def samples_per_step(self) -> int:
        return self.micro_batch_size * self.gradient_accumulation_steps


class SourceSettings(_Section):
    """Where samples come from: a `cai up` run folder, a Kafka topic, or this process."""

    source: SourceKind = Field(
        "file",
        description="Where samples come from: 'file' (a `cai up` run folder, --data), 'kafka' (the "
        "revisions or preferences topic, --kafka) or 'memory' (in-process, for `cai up`).",
    )
    data: str | None = Field(
        None, description="The `cai up` run folder to train on (required for source 'file')."
    )
    kafka: str | None = Field(None, description="Kafka bootstrap HOST:PORT (source 'kafka').")
    kafka_prefix: str = Field("", description="Prefix of the topic names, as given to the services.")
    stream_idle_timeout_s: float | None = Field(
        None, description="Stream sources: end the run after this many seconds without a sample."
    )


class DPOSettings(_Section):
    """What dpo and online-dpo add."""

    beta: float = Field(
        0.1, gt=0, description="DPO temperature: how far the policy may move from the reference."
    )


class OnlineSettings(_Section):
    """What online-dpo adds: the staleness filter, and how each new policy version is published."""

    max_staleness: int | None = Field(
        2,
        ge=0,
        description="Drop (and count) samples generated by a policy more than this many versions "
        "older than the newest published one; 0: strictly on-policy; null: keep all.",
    )
    publish_every: int = Field(
        10,
        ge=1,
        description="online-dpo: publish the adapter as a new policy version every N optimizer steps.",
    )
    serve_policies_port: int | None = Field(
        None,
        description="Serve the published policy archives over HTTP on this port, so services on "
        "other machines can fetch them (their uri becomes http://HOST:PORT/...).",
    )
    policy_url_host: str | None = Field(
        None, description="Host name services reach this trainer by (default: this host's name)."
    )
    rollout_deployment: str | None = Field(
        None,
        description="NAMESPACE/NAME of a policy Deployment (e.g. TGI) to roll through the Kubernetes "
        "API on each published version, for backends that cannot load adapters live.",
    )


# The sections in the order of the docs and of `cai train --help`, with who uses them.
SECTIONS: tuple[tuple[str, type[_Section]], ...] = (
    ("every mode", TrainingSettings),
    ("samples", SourceSettings),
    ("dpo and online-dpo", DPOSettings),
    ("online-dpo", OnlineSettings),
)


# pydantic lists the fields of the last base first: this order gives the order of SECTIONS.
class TrainConfig(OnlineSettings, DPOSettings, SourceSettings, TrainingSettings):
    """Settings of one training run. Unset fields keep their defaults."""

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise InvalidArgument(_first_error(exc, values)) from None

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        """The rules between settings of different sections; each error names the setting to change."""
        if self.source != "file" and self.data is not None:
            raise ValueError(f"data: a run folder is read by source 'file' only, not {self.source!r}")
        if self.source != "file" and self.max_steps is None and self.lr_scheduler != "constant":
            raise ValueError(
                "max_steps: a stream trains until it is stopped unless max_steps is set; without it "
                "the learning rate cannot decay, so set lr_scheduler to 'constant'"
            )
        if self.mode == "online-dpo":
            if self.source == "file":
                raise ValueError("source: online-dpo trains on a stream: use 'kafka' or 'memory'")
            if not self.lora:
                raise ValueError("lora: online-dpo publishes LoRA adapters, not full weights")
        return self

    def check_ready(self) -> None:
        """What a run needs beyond valid values: the data folder and its file, or a broker."""
        if self.source == "kafka" and not self.kafka:
            raise InvalidArgument("kafka: give the broker for source 'kafka' (--kafka HOST:PORT)")
        if self.source != "file":
            return
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
    def topic(self) -> str:
        """The stream sources' topic: revisions for sft, preferences otherwise."""
        return self.kafka_prefix + ("revisions" if self.mode == "sft" else "preferences")

    @property
    def group(self) -> str:
        """The Kafka source's consumer group (for lag monitoring: `PREFIXcai-trainer`)."""
        from cai.kafka.admin import stage_group

        return stage_group("trainer", self.kafka_prefix)

    # ---- construction -------------------------------------------------------------------

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str = "config") -> TrainConfig:
        for key in values:
            if key not in cls.model_fields:
                raise InvalidArgument(f"{where}: {_unknown(key)}")
        try:
            return cls(**values)
        except InvalidArgument as exc:
            raise InvalidArgument(f"{where}: {exc}") from None

    @classmethod
    def from_yaml(
        cls, path: str | Path, overrides: dict[str, Any] | None = None, defaults: dict[str, Any] | None = None
    ) -> TrainConfig:
        """Read a YAML mapping of setting names; `overrides` (set CLI flags) win over the file, which
        wins over `defaults` (the caller's, in place of the models')."""
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
        return cls.from_dict({**(defaults or {}), **loaded, **(overrides or {})}, where=str(path))

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()


# ---- errors -------------------------------------------------------------------------------------


def _unknown(key: object) -> str:
    close = difflib.get_close_matches(str(key), list(TrainConfig.model_fields), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown key {key!r}{hint}"


def _first_error(exc: ValidationError, values: dict[str, Any]) -> str:
    """One line for the first problem: `name: what is wrong`."""
    error = exc.errors()[0]
    if not error["loc"]:  # a rule between settings: its message names the setting
        return str(error.get("ctx", {}).get("error", error["msg"]))
    name = str(error["loc"][0])
    if error["type"] == "extra_forbidden":
        return _unknown(name)
    return f"{name}: {_problem(error, TrainConfig.model_fields[name], values.get(name))}"


def _problem(error: ErrorDetails, info: FieldInfo, value: Any) -> str:
    ctx = error.get("ctx", {})
    if error["type"] == "value_error":
        return str(ctx["error"])
    if error["type"] == "greater_than_equal":
        bound = ctx["ge"]
        return (
            f"must not be negative, got {value}" if bound == 0 else f"must be at least {bound}, got {value}"
        )
    if error["type"] == "greater_than" and ctx["gt"] == 0:
        return f"must be positive, got {value}"
    return f"expected {type_name(info.annotation)}, got {value!r}"


# ---- docs and flags -----------------------------------------------------------------------------


def type_name(hint: Any) -> str:
    origin = get_origin(hint)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(hint))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in get_args(hint))
    if origin is list:
        return f"list[{type_name(get_args(hint)[0])}]"
    return "null" if hint is type(None) else getattr(hint, "__name__", str(hint))


def default_text(info: FieldInfo) -> str:
    default = info.get_default(call_default_factory=True)
    shown = ",".join(default) if isinstance(default, list) else default
    return "-" if shown is None else str(shown)


def markdown_table() -> str:
    """The settings tables of docs/training.md, one per section; a test keeps the two equal."""
    parts = []
    for title, section in SECTIONS:
        lines = [f"**{section.__name__}** ({title}). {section.__doc__}", ""]
        lines += ["| key | type | default | meaning |", "|---|---|---|---|"]
        for name, info in section.model_fields.items():
            escaped = type_name(info.annotation).replace("|", "\\|")  # a bare | would split the cell
            lines.append(f"| `{name}` | {escaped} | `{default_text(info)}` | {info.description} |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


if __name__ == "__main__":
    print(markdown_table())  # the tables for docs/training.md
