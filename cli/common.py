"""What every command shares: the consoles, the error line and the group that prints it."""

from __future__ import annotations

import os
import sys
from typing import Any

import click
from rich.console import Console
from rich.text import Text

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
