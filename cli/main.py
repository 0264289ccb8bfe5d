"""The `cai` command line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
from rich.table import Table

from cli.common import CAIGroup, console, print_error


@click.group(cls=CAIGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="cai-stack")
def main() -> None:
    """Constitutional AI: critique, revise and judge model outputs against a written constitution."""


# ---- models ---------------------------------------------------------------------------------


@main.group(cls=CAIGroup)
def models() -> None:
    """Prepare and list local models."""


@models.command("setup")
@click.option("--force", is_flag=True, help="Convert again even if the model is prepared.")
def models_setup(force: bool) -> None:
    """Install and convert the default model (SmolLM2-135M-Instruct) into $CAI_HOME."""
    from cai.models import setup_default_model

    setup_default_model(progress=console.print, force=force)


@models.command("list")
def models_list() -> None:
    """Show the prepared models."""
    from cai.models import list_models
    from cai.paths import models_dir

    found = list_models()
    if not found:
        console.print(f"no models in {models_dir()}; run `cai models setup`")
        return
    table = Table("name", "path", "size", "source")
    for m in found:
        table.add_row(m.name, str(m.path), f"{m.size_bytes / 1e6:.0f} MB", m.source)
    console.print(table)


# ---- constitution ---------------------------------------------------------------------------


@main.group(cls=CAIGroup)
def constitution() -> None:
    """Validate, show and import constitutions."""


@constitution.command("validate")
@click.argument("files", nargs=-1, required=True)
def constitution_validate(files: tuple[str, ...]) -> None:
    """Check constitution files; print every fault as FILE:LINE: FIELD: problem."""
    from cai.constitution import ConstitutionError, load

    failed = False
    for file in files:
        try:
            c = load(file)
        except ConstitutionError as exc:
            failed = True
            for problem in exc.problems:
                print_error(problem)
            continue
        console.print(
            f"{c.source}: ok ({c.id} {c.version}, {len(c.principles)} principles, sha256 {c.hash[:16]})",
            highlight=False,
        )
    if failed:
        sys.exit(1)


@constitution.command("show")
@click.argument("file", default="default")
@click.option("--json", "as_json", is_flag=True, help="Print the canonical form as JSON.")
def constitution_show(file: str, as_json: bool) -> None:
    """Print a constitution (a file, or a built-in name: default, harmlessness)."""
    from cai.constitution import load

    c = load(file)
    if as_json:
        click.echo(json.dumps({**c.to_dict(), "hash": c.hash}, indent=2, ensure_ascii=False))
        return
    console.print(f"[bold]{c.id}[/bold] {c.version}  sha256 {c.hash}", highlight=False)
    console.print(c.description)
    if c.hard_constraints:
        console.print("\n[bold]Hard constraints[/bold]")
        for h in c.hard_constraints:
            console.print(f"  - {h.text}", highlight=False)
    for tier in c.tiers:
        principles = [p for p in c.principles if p.tier == tier.id]
        console.print(f"\n[bold]{c.tier_rank(tier.id) + 1}. {tier.id}[/bold] {tier.description}")
        table = Table("id", "weight", "why", "critique", "comparison", show_lines=True)
        for p in principles:
            table.add_row(p.id, f"{p.weight:g}", p.rationale, p.critique or "-", p.comparison or "-")
        console.print(table)
    console.print(
        f"\nfew-shot: {len(c.critique_examples)} critique/revision, {len(c.comparison_examples)} comparison"
    )


@constitution.command("import")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["anthropic-2022", "hf-cai"]),
    required=True,
    help="anthropic-2022: the CAI paper repository's JSON files; hf-cai: the open-LLM recipe's JSON.",
)
@click.argument("sources", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="YAML file to write.")
@click.option(
    "--id", "constitution_id", default=None, help="Id of the new constitution (default: from OUTPUT)."
)
def constitution_import(
    fmt: str, sources: tuple[Path, ...], output: Path, constitution_id: str | None
) -> None:
    """Convert another project's constitution files into our YAML format.

    For anthropic-2022, give any of: the critique/revision instructions file, the comparison
    principles file, the critique/revision few-shot file and the comparison few-shot file.
    """
    from cai.constitution import parse
    from cai.importers import import_constitution, slug

    c = import_constitution(fmt, list(sources), constitution_id or slug(output.stem))
    parse(c.to_dict(), str(output))  # the result must load back as a valid constitution
    output.write_text(c.to_yaml(), encoding="utf-8")
    console.print(
        f"wrote {output}: {len(c.principles)} principles, few-shot: {len(c.critique_examples)} "
        f"critique/revision, {len(c.comparison_examples)} comparison",
        highlight=False,
    )


def _add_commands() -> None:
    """The commands kept in modules of their own: up, services, Kafka, trainer, evaluation."""
    from cli import eval, kafka, serve, train, up

    for module in (up, serve, kafka, train, eval):
        for command in module.COMMANDS:
            main.add_command(command)


_add_commands()

if __name__ == "__main__":
    main()
