"""What every command shares: the consoles, the error line and the group that prints it."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any

import click
from rich.console import Console
from rich.text import Text

from cai.engine import CritiqueOptions, JudgeOptions
from cai.errors import CAIError

console = Console()
err_console = Console(stderr=True)


def print_error(line: str) -> None:
    # Text, not markup: messages quote user input and formats that contain [brackets].
    err_console.print(Text.assemble(("error: ", "red"), line), highlight=False, soft_wrap=True)


class CAIGroup(click.Group):
    """Turns domain errors into one clear line on stderr and a non-zero exit, no traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except CAIError as exc:
            for line in str(exc).splitlines():
                print_error(line)
            sys.exit(2)
        except KeyboardInterrupt:
            print_error("interrupted")
            sys.exit(130)


def quiet_transformers() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)


def judge_flags(command: Callable[..., Any]) -> Callable[..., Any]:
    """--k-principles, --no-debias and --cot, handed to the command as `judge_options`."""

    @click.option(
        "-k",
        "--k-principles",
        type=click.IntRange(min=1),
        default=1,
        show_default=True,
        help="Comparison principles averaged per judgment.",
    )
    @click.option("--no-debias", is_flag=True, help="Judge only one ordering of each pair.")
    @click.option("--cot", is_flag=True, help="Chain-of-thought judging (labels clamped to [0.4, 0.6]).")
    @functools.wraps(command)
    def with_judge(*args: Any, k_principles: int, no_debias: bool, cot: bool, **kwargs: Any) -> Any:
        return command(*args, judge_options=JudgeOptions(k_principles, not no_debias, cot), **kwargs)

    return with_judge


def critique_flags(command: Callable[..., Any]) -> Callable[..., Any]:
    """--rounds, handed to the command as `critique_options`."""

    @click.option(
        "--rounds",
        type=click.IntRange(1, 8),
        default=1,
        show_default=True,
        help="Critique/revision rounds per response.",
    )
    @functools.wraps(command)
    def with_critique(*args: Any, rounds: int, **kwargs: Any) -> Any:
        return command(*args, critique_options=CritiqueOptions(rounds), **kwargs)

    return with_critique


device_option = click.option(
    "--device", default=None, help="torch device (default: cuda if present, else cpu)."
)
dtype_option = click.option(
    "--dtype",
    type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
    default="auto",
    show_default=True,
    help="auto: bfloat16 on CUDA and on CPUs with native bf16, else float32.",
)
