"""`cai train`: SFT or soft-label DPO on a `cai up` run folder or the pipeline's Kafka topics.

Every `TrainConfig` setting is a flag (`--micro-batch-size`, `--lora/--no-lora`, ...), generated
from the pydantic models so the two cannot drift; flags that are given win over `--config FILE`.
"""

from __future__ import annotations

import logging
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import click

from trainer.config import TrainConfig, default_text


def _option_type(hint: Any) -> Any:
    origin = get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        (hint,) = [a for a in get_args(hint) if a is not type(None)]
        origin = get_origin(hint)
    if origin is Literal:
        return click.Choice([str(a) for a in get_args(hint)])
    return {int: int, float: float}.get(hint, str)  # lists: comma-separated strings


def _config_options(command: Any) -> Any:
    """One flag per TrainConfig setting, each defaulting to 'not given'."""
    for name, info in reversed(TrainConfig.model_fields.items()):
        flag = "--" + name.replace("_", "-")
        help_text = f"{info.description} [default: {default_text(info)}]"
        if info.annotation is bool:
            option = click.option(f"{flag}/--no-{flag[2:]}", name, default=None, help=help_text)
        else:
            option = click.option(
                flag, name, type=_option_type(info.annotation), default=None, help=help_text
            )
        command = option(command)
    return command


class _WarningLines(logging.Handler):
    """The trainer's warnings (a skipped checkpoint, a duplicate sample) as `warning:` lines."""

    def emit(self, record: logging.LogRecord) -> None:
        from rich.text import Text

        from cli.common import err_console

        err_console.print(Text.assemble(("warning: ", "yellow"), record.getMessage()), soft_wrap=True)


@click.command()
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="YAML file of settings (the flags' names with underscores); flags given here override it.",
)
@_config_options
def train(config_file: Path | None, **flags: Any) -> None:
    """Train the policy: sft on the final revisions, or soft-label dpo on the judge's preferences,
    from a `cai up` run folder (--data) or the pipeline's Kafka topics (--source kafka); online-dpo
    also publishes each new policy version for the policy service to load. Rerunning with the same
    --output-dir resumes from its newest checkpoint; SIGTERM stops after the current step with a
    checkpoint."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from cli.common import console, quiet_transformers

    given = {k: v for k, v in flags.items() if v is not None}
    if config_file is not None:
        config = TrainConfig.from_yaml(config_file, given)
    else:
        config = TrainConfig.from_dict(given, "flags")
    quiet_transformers()

    from trainer import distributed
    from trainer.io import build_trainer

    # Under torchrun: rank 0 reads the data and reports; the other ranks train quietly.
    if not distributed.from_env().leader:
        trainer = build_trainer(config)
        try:
            trainer.train()
        finally:
            trainer.close()
            distributed.shutdown()
        return
    config.check_ready()
    logger = logging.getLogger("cai.trainer")
    logger.addHandler(_WarningLines(level=logging.WARNING))
    logger.setLevel(logging.WARNING)

    with console.status(f"loading {config.model}"):
        trainer = build_trainer(config)
    if config.source == "file":
        where = f"{config.data_file} ({trainer.source.size} samples)"
    else:
        where = f"{config.topic} on {config.kafka}"
    steps = "until stopped" if trainer.total_steps is None else f"{trainer.total_steps} steps"
    world = trainer.dist.world_size
    processes = f" x {world} processes ({config.distributed})" if world > 1 else ""
    console.print(
        f"{config.mode} on {where}, "
        f"{f'LoRA r={config.lora_r}' if config.lora else 'full fine-tuning'}, "
        f"{trainer.device}{processes}, {steps} of {trainer.samples_per_step} samples"
        + (f", resumed at step {trainer.resumed_from}" if trainer.resumed_from is not None else ""),
        highlight=False,
    )
    columns = (
        TextColumn("step"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("train", total=trainer.total_steps, completed=trainer.step, loss="-")
        try:
            result = trainer.train(
                lambda step: progress.update(task, completed=step.step, loss=f"{step.metrics['loss']:.4f}")
            )
        finally:
            trainer.close()
            distributed.shutdown()
    _print_summary(config, result)


def _print_summary(config: TrainConfig, result: Any) -> None:
    from rich.table import Table

    from cli.common import console

    table = Table("", "", title=f"cai train summary ({config.mode})", show_header=False)
    rows = [
        ("steps", f"{result.steps} / {result.total_steps}"),
        ("resumed from step", "-" if result.resumed_from is None else str(result.resumed_from)),
        ("samples this run", str(result.samples)),
        ("duplicates skipped", str(result.duplicates)),
        ("stale samples dropped", str(result.stale)),
        ("sequences truncated", str(result.truncated)),
        ("duration", f"{result.duration_s:.1f} s"),
    ]
    if config.mode == "online-dpo":
        rows.append(("policy version", str(result.last.get("policy_version", "-"))))
    for key in ("loss", "margin", "accuracy", "kl", "lr", "grad_norm"):
        if key in result.last:
            rows.append((f"last {key}", f"{result.last[key]:.4g}"))
    rows.append(("checkpoint", str(result.checkpoint or "-")))
    rows.append(("model", str(result.model_dir or "- (stopped early; rerun to finish)")))
    rows.append(("log", str(Path(config.output_dir) / "log.jsonl")))
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)
    if result.stopped:
        console.print(f"stopped by SIGTERM after step {result.steps}; rerun the same command to resume")


COMMANDS = [train]
